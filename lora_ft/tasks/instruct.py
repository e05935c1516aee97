"""Instruction tuning (Alpaca-style instruction/input/output, or conversations: see data/chat.py): LoRA on a causal LM
through TRL's SFTTrainer, greedy generation, and text metrics (response loss and perplexity, ROUGE-L, share of
answers ending at EOS)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from peft import PeftModel, TaskType
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from .. import data
from ..core import progress, report, stats
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..data import chat
from ..engine import adapters, hardware, methods, models, runs, training
from ..engine.generation import Generation, generate

RESPONSES = "test_responses.json"
# The course's instruction fine-tuning (chapter 7) trains every weight, with no LoRA code to compare with: `bench
# --task instruct` has no course peer.
COURSE_PEER = False
EVAL_COLUMNS = ("loss", "perplexity", "rouge_l", "eos_share")  # what `eval` shows
# `eval A B`'s paired tests (evaluation.compare_pair): paired bootstraps of the mean ROUGE-L and of the loss per
# response token (each example's summed loss over all its tokens), the test examples resampled.
PAIRED = {"rouge_l": ("mean", ("rouge_l",)), "loss": ("ratio", ("loss_sum", "tokens"))}
# Inputs for merge's check when the adapter's own data file is gone (see `check_texts`).
SAMPLE_TEXTS = [
    data.format_prompt("Name three primary colors.") + "Red, yellow and blue.",
    data.format_prompt("Rewrite the sentence in passive voice.", "The cat chased the mouse.")
    + "The mouse was chased by the cat.",
    data.format_prompt("What is the capital of Italy?") + "The capital of Italy is Rome.",
    data.format_prompt("Convert 3 kilometers to meters.") + "3 kilometers is 3000 meters.",
]


def load_splits(
    config: RunConfig, fractions: tuple[float, float, float] = data.INSTRUCTION_FRACTIONS
) -> tuple[Path, DatasetDict]:
    """The data file, and its train/val/test split fixed by `config.seed` (instructions or conversations alike)."""
    path = data.resolve_data_file(data.INSTRUCTION_DATA, config.data)
    return path, data.instruction_splits(chat.read_examples(path), config.seed, fractions, path)


def prompt_completion(split: Dataset, eos_token: str) -> Dataset:
    """TRL's prompt-completion format. The completion ends with EOS so that the model learns to stop; TRL keeps
    it as a target (labels are built before padding, and padding is labelled -100, so pad = EOS is harmless)."""
    return Dataset.from_dict({"prompt": split["prompt"], "completion": [o + eos_token for o in split["output"]]})


def examples(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> Dataset:
    """What SFTTrainer and `response_loss` take: prompt-completion pairs of instructions, or conversations already
    tokenized with labels on their assistant turns only (`chat.encoded`: none for those over `max_length`, which the
    caller leaves out or refuses)."""
    if chat.is_chat(split):
        return chat.encoded(split, tokenizer, max_length)
    return prompt_completion(split, tokenizer.eos_token)


def _encoded(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a row of `examples`: a conversation's as `chat.encoded` made them."""
    if "input_ids" in row:
        return row["input_ids"], row["labels"]
    return encode(tokenizer, row["prompt"], row["completion"])


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + completion with the prompt masked (-100), as SFTTrainer builds them:
    the completion starts where the tokenized prompt and the tokenized whole first differ."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
    return ids, [-100] * start + ids[start:]


def _within_length(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[Dataset, int]:
    """Examples whose prompt + completion fit in `max_length` tokens, and how many did not. Truncating them
    instead would cut off the final EOS and teach the model not to stop."""
    keep = [i for i, row in enumerate(split) if len(_encoded(tokenizer, row)[0]) <= max_length]
    return split.select(keep), len(split) - len(keep)


def _check_test_fits(test: Dataset, tokenizer: PreTrainedTokenizerBase, positions: int, path: Path) -> None:
    """Refuse, before the first step, a test example longer than the model's `positions`, naming it: it cannot be
    scored, and found only when scoring, after training, it failed every `--resume` the same way. (Train and val
    leave out examples over `max_length`; the test split stays as the seed made it.)"""
    for row, pair in zip(test, examples(test, tokenizer, positions), strict=True):
        tokens = len(_encoded(tokenizer, pair)[0])
        if tokens > positions:
            shown = row.get("record") or f"{path}: the test example {(row.get('instruction') or row['prompt'])[:40]!r}"
            raise UserError(
                f"{shown} is in the test split and is {tokens} tokens, more than the model's {positions} positions: "
                "shorten it"
            )


def bench_data(
    train: Dataset, tokenizer: PreTrainedTokenizerBase, config: RunConfig, pad_to_longest: bool
) -> tuple[Dataset, DataCollatorForSeq2Seq]:
    """`bench`'s rows: the training examples that fit in `max_length`, tokenized with the prompt masked as SFTTrainer
    masks it (`encode`); the collator pads inputs with the pad token and labels with -100, per batch or every row to
    the longest training example."""
    kept, _ = _within_length(examples(train, tokenizer, config.max_length), tokenizer, config.max_length)
    rows = [_encoded(tokenizer, row) for row in kept]
    dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]})
    longest = max(len(ids) for ids, _ in rows) if pad_to_longest else None
    padding = "max_length" if pad_to_longest else True
    return dataset, DataCollatorForSeq2Seq(tokenizer, padding=padding, max_length=longest, label_pad_token_id=-100)


class InstructTrainer(training.Resumable, SFTTrainer):
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        if training.on_cpu(model) and model.training:  # evaluation keeps SFTTrainer's own (and its metrics)
            return training.labelled_positions_loss(
                self, model, inputs, kwargs.get("num_items_in_batch"), return_outputs
            )
        return super().compute_loss(model, inputs, return_outputs, **kwargs)


class FusedHeadTrainer(training.Resumable, Trainer):
    """`bench`'s trainer for lora_ft's instruct step: the loss `InstructTrainer` computes (on a GPU, TRL's fused LM
    head), on rows encoded as SFTTrainer encodes them (`bench_data`), without TRL's dataset preparation timed."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        if training.on_cpu(model):
            return training.labelled_positions_loss(
                self, model, inputs, kwargs.get("num_items_in_batch"), return_outputs
            )
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        loss = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def bench_trainer(model: torch.nn.Module, pad_to_longest: bool) -> type[Trainer]:
    """The Trainer `bench` times: as lora_ft trains (`FusedHeadTrainer`, the fused head added to `model`'s base),
    or for the naive baseline a plain Trainer, whose model computes the logits of every position."""
    if pad_to_longest:
        return training.ClassifierTrainer
    add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return FusedHeadTrainer


def build_trainer(
    config: RunConfig,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    val: Dataset,
    output_dir: Path,
    precision: str,
) -> SFTTrainer:
    """SFTTrainer on prompt-completion data: LoRA attached from `peft_config`, loss on completion tokens only."""
    args = training.training_args(
        config,
        output_dir,
        len(train),
        "loss",
        precision,
        SFTConfig,
        max_length=config.max_length,
        completion_only_loss=True,
        packing=False,
    )
    hardware.fused_head_at_labelled_positions()
    lora = methods.peft_config(base, TaskType.CAUSAL_LM, config)  # None: full fine-tuning
    return InstructTrainer(
        model=base, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer, peft_config=lora
    )


def response_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    batch_size: int,
    desc: str = "response loss",
) -> dict[str, Any]:
    """Mean cross-entropy per completion token (EOS included) and its perplexity: every token weighs the same,
    unlike Trainer's mean of batch means. `per_example`: each example's summed loss and its tokens, in order."""
    encoded = [_encoded(tokenizer, row) for row in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
    sums, counts = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=int)
    device = next(model.parameters()).device
    batches = range(0, len(encoded), batch_size)
    for start in progress.bar(batches, desc=desc, unit="batch", hidden=len(batches) <= 1):
        chosen = order[start : start + batch_size]
        batch = [encoded[i] for i in chosen]
        ids = _pad([torch.tensor(i) for i, _ in batch], tokenizer.pad_token_id).to(device)
        labels = _pad([torch.tensor(label) for _, label in batch], -100).to(device)[:, 1:]
        with torch.no_grad():
            mask = _pad([torch.ones(len(i), dtype=torch.long) for i, _ in batch], 0).to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        sums[chosen], counts[chosen] = losses.sum(1).double().cpu().numpy(), (labels != -100).sum(1).cpu().numpy()
    loss, per_example = float(sums.sum() / max(counts.sum(), 1)), {"loss_sum": sums, "tokens": counts}
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": int(counts.sum()),
        "per_example": per_example,
    }


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def rouge_l(references: list[str], responses: list[str]) -> list[float]:
    """ROUGE-L F1 (rouge-score, with stemming) of each response against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, out)["rougeL"].fmeasure for ref, out in zip(references, responses, strict=True)]


def score_responses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test: Dataset, config: RunConfig, who: str = "tuned"
) -> tuple[dict[str, Any], list[Generation], dict[str, np.ndarray]]:
    """Loss/perplexity on the reference responses, and ROUGE-L (with a bootstrap 95% interval over the examples) and
    EOS share of greedy generations (`who` names the model in progress bars); then each example's ROUGE-L, summed
    loss and tokens, which `eval A B` pairs."""
    pairs = examples(test, tokenizer)
    generations = generate(
        model, tokenizer, test["prompt"], config.max_new_tokens, config.eval_batch_size, desc=f"answering test ({who})"
    )
    metrics = response_loss(model, tokenizer, pairs, config.eval_batch_size, f"test loss ({who})")
    scores = metrics.pop("per_example")
    scores["rouge_l"] = np.array(rouge_l(test["output"], [g.response for g in generations]))
    metrics.update(
        rouge_l=float(scores["rouge_l"].mean()),
        rouge_l_ci95=stats.mean_interval(scores["rouge_l"]),
        eos_share=sum(g.stopped_at_eos for g in generations) / len(generations),
        mean_new_tokens=sum(g.new_tokens for g in generations) / len(generations),
        examples=len(test),
    )
    return metrics, generations, scores


def score_test(loaded: adapters.Loaded, test: Dataset, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test metrics of a loaded adapter on the examples it was scored on in training (the first `test_limit`),
    answered as then, and each example's scores."""
    test = test.select(range(min(config.test_limit or len(test), len(test))))
    test = chat.prepare(DatasetDict(train=test), loaded.tokenizer)[0]["train"]  # conversations: their prompts
    metrics, _, scores = score_responses(loaded.model, loaded.tokenizer, test, config)
    return metrics, scores


def response_records(test: Dataset, generations: list[Generation]) -> list[dict[str, Any]]:
    """test_responses.json: the example as given (instruction/input, the raw prompt, or the conversation before its
    last answer) with the reference answer and the model's."""
    return [
        {**chat.as_given(row), "output": row["output"], "model_response": g.response}
        for row, g in zip(test, generations, strict=True)
    ]


def train(config: RunConfig, overwrite: bool = False, resume: Path | None = None) -> adapters.TrainResult:
    """Instruction-tune with LoRA and write the adapter folder; returns the folder, manifest and trained model."""
    run = training.start("instruct", config, overwrite, resume, load_splits, _new_base)
    config, tokenizer = run.config, run.tokenizer
    splits, template = chat.prepare(run.splits, tokenizer)  # conversations: the tokenizer gets its chat template
    test = splits["test"].select(range(min(config.test_limit or len(splits["test"]), len(splits["test"]))))
    pairs = {split: examples(splits[split], tokenizer, config.max_length) for split in ("train", "val")}
    (train_pairs, dropped_train), (val_pairs, dropped_val) = (
        _within_length(pairs[split], tokenizer, config.max_length) for split in ("train", "val")
    )
    val_pairs = training.val_sample(val_pairs, config)
    if len(train_pairs) == 0 or len(val_pairs) == 0:
        split = "training" if len(train_pairs) == 0 else "val"
        raise UserError(f"{run.data_path}: no {split} example fits in `max_length` {config.max_length} tokens")
    _check_test_fits(test, tokenizer, models.context_length(run.base) or config.max_length, run.data_path)

    with training.run_folder(run, overwrite, resume) as tmp:
        checkpoints = tmp / runs.CHECKPOINTS
        untuned = None
        if not methods.adapter_off_is_base(config):  # training (or PiSSA's start) changes the base: score it now
            untuned = score_responses(run.base, tokenizer, test, config, "untuned base")[0]
        trainer = build_trainer(config, run.base, tokenizer, train_pairs, val_pairs, checkpoints, run.precision)
        methods.keep_initial(trainer.model, config, tmp / methods.INITIAL_ADAPTER)
        training.fit(trainer, resume)
        model: PeftModel = training.trained_model(trainer)
        # Every process scores the same examples with the same weights: the main one alone would not finish sooner,
        # and sharded models (FSDP, ZeRO-3) need all processes in each forward pass.
        val = response_loss(model, tokenizer, val_pairs, config.eval_batch_size, "val loss")
        val.pop("per_example")
        metrics: dict[str, Any] = {"val": val}
        metrics["test"], generations, _ = score_responses(model, tokenizer, test, config)
        if untuned is None:
            with model.disable_adapter():
                untuned = score_responses(model, tokenizer, test, config, "untuned base")[0]
        metrics["test_base"] = untuned
        described = {
            "fractions": list(data.INSTRUCTION_FRACTIONS),
            "dropped_longer_than_max_length": {"train": dropped_train, "val": dropped_val},
            "val_evaluated": len(val_pairs),
            "test_examples_generated": len(test),
            **chat.described(splits["train"], template),
        }
        generation = {
            "greedy": True,
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.eval_batch_size,
            "stops_at": tokenizer.eos_token,
        }
        manifest = training.manifest(run, trainer, model, described, metrics, generation=generation)
        training.save(run, tmp, model, manifest, trainer)
        if run.processes.is_main_process:
            records = response_records(test, generations)
            (tmp / RESPONSES).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return adapters.TrainResult(run.output, manifest, model)


def _new_base(
    source: models.ModelSource, tokenizer: Any, splits: DatasetDict, config: RunConfig, precision: str
) -> PreTrainedModel:
    return models.load_causal_base(source, tokenizer, config.quantize, precision, methods.trains_base(config))


def load_base(
    source: models.ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    _: Manifest,
    quantize: str | None,
    precision: str,
) -> PreTrainedModel:
    return models.load_causal_base(source, tokenizer, quantize, precision)


load = adapters.loader("instruct", load_base)  # TaskModule.load, on the causal LM base above


def respond(
    adapter: str | Path,
    requests: list[dict[str, Any]],
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> list[Generation]:
    """Answers from a trained adapter. Each request has `instruction` (and optional `input`) or `messages`, put in
    the template the adapter was trained with (`chat.render_prompt`), or a ready `prompt`. Defaults (length, batch
    size) come from the adapter's manifest, so that greedy answers to its test examples reproduce
    test_responses.json."""
    loaded = load(adapter, force=force)
    generation = loaded.manifest.generation or {}
    set_seed(seed)  # sampling only; greedy answers do not depend on it
    prompts = [chat.render_prompt(loaded.manifest, loaded.tokenizer, r) for r in requests]
    return generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens or generation["max_new_tokens"],
        batch_size or generation["batch_size"],
        temperature,
        top_p,
    )


def check_texts(manifest: Manifest, count: int) -> list[str]:
    """Prompt + reference response of the first `count` examples of the adapter's test split, rebuilt from its
    manifest; conversations whole, in the chat template it records (on the base's tokenizer, as in training)."""
    test = load_splits(manifest.run_config, manifest.fractions)[1]["test"]
    test = test.select(range(min(count, len(test))))
    if not chat.is_chat(test):
        return [row["prompt"] + row["output"] for row in test]
    tokenizer = models.load_tokenizer(models.source_from_manifest(manifest.base))
    tokenizer.chat_template = chat.recorded_template(manifest)
    return [chat.render(tokenizer, messages) for messages in test["messages"]]


def summary(manifest: Manifest, folder: Path) -> list[str]:
    """A finished run for a person: tuned against untuned on the test examples, how it trained, what was left out,
    where it is."""
    lines = [report.instruct_table(manifest.metrics), report.trained(manifest.training)]
    dropped, limit = manifest.data["dropped_longer_than_max_length"], manifest.config["max_length"]
    if any(dropped.values()):
        lines.append(f"longer than --max-length {limit} tokens, left out: {dropped}")
    return [*lines, f"adapter: {folder}  (responses: {folder / RESPONSES})"]
