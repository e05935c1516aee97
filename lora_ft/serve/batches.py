"""How `serve` answers one batch of jobs (serve.Job) for one adapter: labels in one forward pass, or answers
generated together, streamed as they come, each row stopped at its own limit or when its request is cancelled."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

from ..engine import generation
from ..tasks import task_code


def _classify(model: Any, adapter: Any, batch: list[Any]) -> None:
    texts = [text for job in batch for text in job.inputs]
    labels, max_length = adapter.manifest.label_names, adapter.manifest.config["max_length"]
    classify_batch = task_code.classifier(adapter.task.name).classify_batch
    predictions = iter(classify_batch(model, adapter.tokenizer, texts, labels, max_length))
    for job in batch:
        job.notify("done", list(itertools.islice(predictions, len(job.inputs))))


def _generate(model: Any, adapter: Any, batch: list[Any]) -> None:
    sampling = batch[0].sampling
    watch = _Watch(batch, adapter.tokenizer)
    prompts = [job.inputs[0] for job in batch]
    longest = max(job.sampling.max_tokens for job in batch)
    # Sampling draws from torch's one global generator: one sampling batch at a time (across bases), so that a seed
    # alone decides its sample. A seeded job runs alone (see Job.key).
    with _SAMPLING if sampling.temperature > 0 else contextlib.nullcontext():
        if sampling.temperature > 0 and sampling.seed is not None:  # greedy rows share batches: no seed of theirs
            set_seed(sampling.seed)
        generation.generate_batch(
            model,
            adapter.tokenizer,
            prompts,
            longest,
            generation.sampling_args(sampling.temperature, sampling.top_p),
            streamer=watch,
            stopping_criteria=StoppingCriteriaList([watch]),
        )
    watch.finish()


_SAMPLING = threading.Lock()


RUNS: dict[str, Callable[[Any, Any, list[Any]], None]] = {"classify": _classify, "generate": _generate}


class _Watch(StoppingCriteria):
    """`generate`'s streamer and stopping criterion for one batch: it keeps each row's new tokens (up to its EOS or
    its own `max_tokens`), streams the text they add, and stops rows whose request was cancelled."""

    def __init__(self, jobs: list[Any], tokenizer: Any):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.width = 0  # the padded prompts' length

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2:  # generate hands the streamer the prompts first
            self.width = value.shape[1]
            return
        for i, token in enumerate(value.tolist()):
            job, tokens = self.jobs[i], self.tokens[i]
            if self._done(i) or job.cancelled.is_set():
                continue
            tokens.append(token)
            if job.stream:
                self._show(i, self._text(tokens))

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.width  # new tokens in every row so far, the one just chosen included
        stop = [job.cancelled.is_set() or made >= job.sampling.max_tokens for job in self.jobs]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        for i, job in enumerate(self.jobs):
            made = generation.answer(self.tokenizer, job.inputs[0], self.tokens[i])
            if job.stream:
                self._show(i, made.response, final=True)
            job.adapter.base.stats.count("tokens", len(self.tokens[i]))
            cancelled = job.cancelled.is_set() and not self._done(i)
            if cancelled:
                job.adapter.base.stats.count("cancelled")
            job.notify("done", (made, "cancelled" if cancelled else _finish_reason(made)))

    def _done(self, i: int) -> bool:
        tokens = self.tokens[i]
        return len(tokens) >= self.jobs[i].sampling.max_tokens or self.tokenizer.eos_token_id in tokens[-1:]

    def _text(self, tokens: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True).lstrip()

    def _show(self, i: int, text: str, final: bool = False) -> None:
        """Send the text added since the last call. Until the end, trailing whitespace and a character still
        incomplete (its bytes split across tokens) are held back, so that the pieces add up to the final answer."""
        if not final:
            text = text.rstrip().removesuffix("\ufffd")
        job = self.jobs[i]
        if len(text) > len(job.shown):
            job.notify("text", text[len(job.shown) :])
            job.shown = text


def _finish_reason(made: generation.Generation) -> str:
    return "stop" if made.stopped_at_eos else "length"
