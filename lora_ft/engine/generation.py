"""Generation with a causal LM, shared by instruct's scoring, `generate`, `chat`, `serve` and `prefer`: prompts
answered in batches (greedy unless sampling), each answer cut at its EOS and independent of its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..core import progress
from ..core.errors import UserError
from . import models


@dataclass
class Generation:
    prompt: str
    response: str
    stopped_at_eos: bool
    new_tokens: int


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    desc: str = "answering",
) -> list[Generation]:
    """Responses to `prompts` (already templated), greedy unless `temperature` > 0, each ending at EOS or after
    `max_new_tokens` (or what the model's context leaves after it). Prompts run shortest first, left-padded, up to
    `batch_size` at a time; results come back in order. A greedy answer does not depend on its batch-mates: left
    padding is masked (and positions follow the mask), and a batch never holds a prompt so long that the room it
    leaves would cut a shorter one's answer (`_batches`)."""
    prompts = list(prompts)  # a dataset's column is a sequence, not the list a tokenizer takes
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    context = models.context_length(model)
    room = [min(max_new_tokens, context - n) if context else max_new_tokens for n in lengths]  # each one's, alone
    results: dict[int, Generation] = {}
    sampling = sampling_args(temperature, top_p)
    shown = progress.bar(total=len(prompts), desc=desc, unit="answer", hidden=len(prompts) <= batch_size)
    try:
        for chunk in _batches(lengths, room, context, batch_size):
            rows = generate_batch(model, tokenizer, [prompts[i] for i in chunk], room[chunk[0]], sampling)
            for i, row in zip(chunk, rows, strict=True):
                results[i] = answer(tokenizer, prompts[i], row[: room[i]])
            shown.update(len(chunk))
    finally:
        shown.close()
    return [results[i] for i in range(len(prompts))]


def _batches(lengths: list[int], room: list[int], context: int | None, batch_size: int) -> list[list[int]]:
    """Prompts in batches, shortest first. A batch is as wide as its longest prompt, and what that width leaves of
    the context must be the whole room of its shortest one (the others' room is no larger): a long prompt beside a
    short one would otherwise cut the short one's answer."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (context is None or lengths[i] + room[last[0]] <= context):
            last.append(i)
        else:
            batches.append([i])
    return batches


def sampling_args(temperature: float, top_p: float) -> dict[str, Any]:
    """`model.generate`'s sampling arguments: greedy at temperature 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False}


def generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    sampling: dict[str, Any],
    **watch: Any,
) -> list[list[int]]:
    """`prompts` as one left-padded batch through `model.generate`: each row's new tokens (an EOS and the padding
    after it included), at most `max_new_tokens` and what the model's context leaves. `watch`: generate's
    `streamer` and `stopping_criteria` (serve streams tokens and stops cancelled rows)."""
    context = models.context_length(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    width = inputs["input_ids"].shape[1]
    budget = min(max_new_tokens, context - width) if context else max_new_tokens
    if budget <= 0:
        raise UserError(f"a prompt of {width} tokens leaves no room to answer within {context} tokens")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=budget,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
            **watch,
        )
    return output[:, width:].tolist()


def answer(tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: list[int]) -> Generation:
    """A row of new tokens as a response: up to its first EOS, decoded without special tokens, stripped."""
    stopped = tokenizer.eos_token_id in tokens
    new = tokens[: tokens.index(tokenizer.eos_token_id)] if stopped else tokens
    return Generation(prompt, tokenizer.decode(new, skip_special_tokens=True).strip(), stopped, len(new))


def check_sampling(max_new_tokens: int | None, temperature: float, top_p: float) -> dict[str, Any]:
    """Generation settings as `generate` takes them, checked."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"`temperature` must be >= 0 and `top_p` in (0, 1], got {temperature}, {top_p}")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise UserError(f"`max_new_tokens` must be > 0, got {max_new_tokens}")
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
