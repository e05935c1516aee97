"""`bench --inference`: how fast a trained adapter answers. lora_ft's `predict` and `generate` paths (inputs
batched, shortest first, generation with the KV cache) against a naive loop: one input at a time, fp32, and for
generation no cache (the whole sequence run again for every new token, as the course's `generate_text_simple`
does). GPT-2-124M architecture with random weights and an unmerged LoRA adapter, as `predict` and `generate`
load it; the real tokenizer and the real test messages and instructions. Both paths must give the same answers:
the figures say how many did."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import TaskType, get_peft_model
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, set_seed

from ..core import registry
from ..core.config import load_config
from ..engine import generation, methods
from ..tasks import task_code
from . import speed


def run(
    quick: bool = False,
    tokenizer: str | None = None,
    data: str | None = None,
    seed: int = 123,
    architecture: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Texts per second classified and tokens per second generated, lora_ft's path against the naive loop."""
    tok = speed.load_tokenizer(tokenizer)
    set_seed(seed)
    architecture = {"pad_token_id": tok.pad_token_id, **(architecture or {})}
    return {
        "quick": quick,
        "model": f"GPT-2 architecture {architecture}, random weights, LoRA unmerged",
        "machine": speed.machine(),
        "predict": measure_predict(tok, data, seed, architecture, 64 if quick else None),
        "generate": measure_generate(tok, seed, architecture, 4 if quick else 16, 32 if quick else 64),
    }


def _with_lora(model: torch.nn.Module, task: TaskType, config: Any) -> torch.nn.Module:
    return get_peft_model(model, methods.peft_config(model, task, config)).eval()


def _timed(work: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def measure_predict(tok: Any, data: str | None, seed: int, architecture: dict, count: int | None) -> dict[str, Any]:
    """The spam test split (its first `count` messages) classified by `predict`'s path (batches of the recipe's
    eval batch size, shortest first) and one message at a time."""
    classify = task_code.classifier()
    config = load_config(registry.serving("classify").name, overrides={"model": "gpt2", "data": data, "seed": seed})
    texts = list(classify.load_splits(config)[1]["test"]["text"])[:count]
    base = GPT2ForSequenceClassification(GPT2Config(**architecture, num_labels=2))
    model = _with_lora(base, TaskType.SEQ_CLS, config)
    encoded = classify.tokenize(Dataset.from_dict({"text": texts}), tok, config.max_length)
    batched, fast = _timed(lambda: classify.predict_logits(model, tok, encoded, config.eval_batch_size))

    def one_at_a_time() -> np.ndarray:
        with torch.no_grad():
            rows = [model(**tok(t, return_tensors="pt", truncation=True, max_length=config.max_length)) for t in texts]
        return torch.cat([r.logits for r in rows]).numpy()

    naive, slow = _timed(one_at_a_time)
    return {
        "texts": len(texts),
        "batch_size": config.eval_batch_size,
        "texts_per_second": len(texts) / fast,
        "naive_texts_per_second": len(texts) / slow,
        "speedup": slow / fast,
        "same_labels": float(np.mean(batched.argmax(-1) == naive.argmax(-1))),
        "max_logit_difference": float(np.abs(batched - naive).max()),
    }


def measure_generate(tok: Any, seed: int, architecture: dict, count: int, new_tokens: int) -> dict[str, Any]:
    """`count` test instructions answered greedily, up to `new_tokens` each (or EOS), by `generate`'s path (one
    batch, left-padded, KV cache) and by the naive loop."""
    config = load_config(registry.serving("generate").name, overrides={"model": "gpt2", "seed": seed})
    prompts = list(task_code.generator().load_splits(config)[1]["test"]["prompt"])[:count]
    model = _with_lora(GPT2LMHeadModel(GPT2Config(**architecture)), TaskType.CAUSAL_LM, config)
    answers, fast = _timed(lambda: generation.generate(model, tok, prompts, new_tokens, batch_size=count))

    def one_at_a_time() -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            new: list[int] = []
            with torch.no_grad():
                while len(new) < new_tokens and (not new or new[-1] != tok.eos_token_id):
                    token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                    ids, new = torch.cat([ids, torch.tensor([[token]])], 1), [*new, token]
            out.append(new[:-1] if new[-1] == tok.eos_token_id else new)
        return out

    naive, slow = _timed(one_at_a_time)
    produced, naive_produced = sum(a.new_tokens for a in answers), sum(len(n) for n in naive)
    same = [tok.decode(n, skip_special_tokens=True).strip() == a.response for a, n in zip(answers, naive, strict=True)]
    return {
        "prompts": count,
        "max_new_tokens": new_tokens,
        "tokens": produced,
        "tokens_per_second": produced / fast,
        "naive_tokens_per_second": naive_produced / slow,
        "speedup": (produced / fast) / (naive_produced / slow),
        "same_answers": float(np.mean(same)),
    }
