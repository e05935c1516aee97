"""`serve`'s library: trained adapters loaded onto shared bases, and requests run in batches. Adapters whose bases are
the same (same weights, same task's model class, same quantisation) share one copy of it: one PEFT model per base,
each adapter a named PEFT adapter on it, switched per batch (a classifier's head is PEFT's `modules_to_save`, kept
per adapter). A worker thread per base takes the requests queued for it, a batch at a time: those for one adapter
that arrive within `batch_wait_ms` of each other run as one forward pass (one `generate` call). The queue is
bounded. The HTTP side (FastAPI) is `server`, the listening socket and its connections' deadlines `sockets`; this module
knows nothing of HTTP."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from ..core import registry
from ..core.commands import ServeLimits as Limits
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..data import chat
from ..engine import adapters, generation, methods, models
from ..tasks import task_code
from . import batches

log = logging.getLogger(__name__)


class NotFound(UserError):
    """A request names a model this server has not loaded (HTTP 404)."""


class Busy(Exception):
    """The queue of a base is full: the request is refused, to be retried later (HTTP 503)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # already capped by what the model's context leaves after the prompt
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


Notify = Callable[[str, Any], None]  # ("text", delta) while streaming, then ("done", result) or ("error", message)


@dataclass(eq=False)
class Job:
    """One request's work: texts to classify, or one prompt to answer. `notify` is called from the worker thread."""

    adapter: Adapter
    inputs: list[str]
    lengths: list[int]  # tokens of each input
    notify: Notify
    sampling: Sampling | None = None
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    shown: str = ""  # the text streamed so far (kept here, so that a row run again alone does not repeat it)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a forward pass: one adapter, one kind of sampling. A seeded job runs alone,
        so that its seed alone decides its sample (as `generate --seed` does)."""
        s = self.sampling
        if s is None or s.temperature == 0:
            return (self.adapter.name,)
        return (self.adapter.name, s.temperature, s.top_p, id(self) if s.seed is not None else None)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Adapter:
    """One served adapter: the model a request names (its folder's name)."""

    name: str
    path: Path
    task: registry.Task
    manifest: Manifest
    tokenizer: Any  # used by the base's worker thread only
    checker: Any  # a copy, for counting a request's tokens on the server's thread (tokenizers are not thread-safe)
    base: Base
    peft_name: str
    weight_bytes: int = 0
    checking: threading.Lock = field(default_factory=threading.Lock)  # requests are checked in several threads

    def count_tokens(self, text: str) -> int:
        with self.checking:
            return len(self.checker(text)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """What /v1/models says of it."""
        manifest = self.manifest
        metric = self.task.key_metric
        created = datetime.fromisoformat(manifest.created)
        return {
            "id": self.name,
            "object": "model",
            "created": int(created.timestamp()),
            "owned_by": "lora_ft",
            "task": manifest.task,
            "method": methods.of(manifest.config).name,  # lora, dora, ia3, vera, or full (a whole model)
            "serves": self.task.serves,
            "base": adapters.base_name(manifest.base),
            "created_at": manifest.created,
            "metric": {"name": metric, "value": manifest.test_metric(metric)},
            "metrics": {k: v for k, v in manifest.metrics.get("test", {}).items() if isinstance(v, (int, float))},
            "labels": manifest.label_names or None,
            "weight_bytes": self.weight_bytes,
        }


class Base:
    """One base model in memory with its adapters, and the worker thread that runs their batches."""

    def __init__(self, loaded: adapters.Loaded, model_class: str, limits: Limits, stats: Stats):
        self.loaded, self.model, self.model_class = loaded, loaded.model, model_class
        self.limits, self.stats = limits, stats
        self.context = models.context_length(self.model)
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        self.weight_bytes = 0
        self.using = threading.Lock()  # held by a batch, and by an adapter being added to this base
        self.thread = threading.Thread(target=self._work, name=f"serve-{adapters.base_name(loaded.base)}", daemon=True)

    def submit(self, job: Job) -> None:
        with self.ready:
            if len(self.waiting) >= self.limits.queue_size:
                self.stats.count("refused")
                raise Busy(f"the queue for {job.adapter.name}'s base is full ({self.limits.queue_size}): retry later")
            self.waiting.append(job)
            self.ready.notify()

    def _work(self) -> None:
        while True:
            batch = self._take()
            try:
                with self.using:
                    self._run(batch)
            except Exception as e:  # a failed batch: each request runs again alone, so only one that fails alone fails
                log.exception("batch of %d for %s failed", len(batch), batch[0].adapter.name)
                if len(batch) == 1:
                    batch[0].notify("error", f"{type(e).__name__}: {e}")
                    continue
                for job in batch:
                    self._run_alone(job)

    def _run_alone(self, job: Job) -> None:
        try:
            with self.using:
                self._run([job])
        except Exception as e:
            log.exception("request for %s failed", job.adapter.name)
            job.notify("error", f"{type(e).__name__}: {e}")

    def _take(self) -> list[Job]:
        """The oldest waiting job and the ones that can share its forward pass, after a short wait for more."""
        batch: list[Job] = []
        with self.ready:
            while not batch:  # empty when every waiting job was cancelled
                while not self.waiting:
                    self.ready.wait()
                deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
                while len(self.waiting) < self.limits.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self.ready.wait(left)
                for job in list(self.waiting):
                    if job.cancelled.is_set():
                        self.waiting.remove(job)
                        self.stats.count("cancelled")
                    elif not batch or (job.key == batch[0].key and self._fits(batch, job)):
                        self.waiting.remove(job)
                        batch.append(job)
        return batch

    def _fits(self, batch: list[Job], job: Job) -> bool:
        """Whether `job` can join: rows within the batch size, and (generating) every row's answer within the
        context, the batch being as wide as its longest prompt."""
        jobs = [*batch, job]
        if sum(len(j.inputs) for j in jobs) > self.limits.max_batch_size:
            return False
        if job.sampling is None or self.context is None:
            return True
        return max(max(j.lengths) for j in jobs) + max(j.sampling.max_tokens for j in jobs) <= self.context

    def _run(self, batch: list[Job]) -> None:
        adapter = batch[0].adapter
        if adapter.peft_name in getattr(self.model, "peft_config", {}):  # not a fully fine-tuned model
            self.model.set_adapter(adapter.peft_name)
        self.stats.batch(sum(len(job.inputs) for job in batch))
        batches.RUNS[adapter.task.serves](self.model, adapter, batch)


class Stats:
    """Counters for /health: requests, batches and their sizes, refusals, cancellations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"requests": 0, "batches": 0, "rows": 0, "largest_batch": 0, "refused": 0, "cancelled": 0}
        self.values["tokens"] = 0  # generated

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.values[name] += n

    def batch(self, rows: int) -> None:
        with self.lock:
            self.values["batches"] += 1
            self.values["rows"] += rows
            self.values["largest_batch"] = max(self.values["largest_batch"], rows)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


class Registry:
    """The served adapters by name, their bases, limits and counters; requests come in through `classify` and
    `generate`, which check them and queue their jobs."""

    def __init__(self, served: dict[str, Adapter], bases: list[Base], limits: Limits, stats: Stats):
        self.adapters, self.bases, self.limits, self.stats = served, bases, limits, stats
        self.keys: dict[tuple, Base] = {}  # what makes bases the same (see `add`)

    def add(self, path: str | Path, name: str) -> Adapter:
        """Load the adapter at `path` as model `name`: onto a base in memory when one is the same (between two of its
        batches), else onto a new one, whose worker starts here."""
        manifest = adapters.read_manifest(path)
        task = registry.get(manifest.task, f"{path}: task")
        source = models.source_from_manifest(manifest.base)
        key = (task.model_class, source.kind, source.location, source.gguf_file, manifest.as_trained)
        key += (len(manifest.label_names),)  # a classifier's base has a head of that many labels
        # one PEFT model holds adapters of one kind; a fully fine-tuned model is a base of its own, shared by none
        method = methods.of(manifest.config)
        key += (method.name, None if method.adapter else str(path))
        base, peft_name = self.keys.get(key), f"served_{len(self.adapters)}"  # PEFT names: no dots, unlike folders
        started = time.perf_counter()
        with base.using if base else contextlib.nullcontext():
            loaded = task_code.get(task.name).load(path, onto=base.loaded if base else None, name=peft_name)
        if base is None:
            base = self.keys[key] = Base(loaded, task.model_class, self.limits, self.stats)
            self.bases.append(base)
        checker = copy.deepcopy(loaded.tokenizer)
        adapter = Adapter(name, Path(path), task, loaded.manifest, loaded.tokenizer, checker, base, peft_name)
        self.adapters[name] = adapter
        log.info("loaded %s (%s) in %.1f s", name, manifest.task, time.perf_counter() - started)
        _measure(self.bases, self.adapters)
        if not base.thread.is_alive():
            base.thread.start()
        return adapter

    def set_limits(self, limits: Limits) -> None:
        """New limits, from the next batch on (bench --serve compares batch sizes on the same loaded models)."""
        self.limits = limits.check()
        for base in self.bases:
            base.limits = self.limits

    def get(self, name: str, serves: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise NotFound(f"model {name!r} is not served here (served: {', '.join(self.adapters)})")
        if adapter.task.serves != serves:
            raise UserError(f"model {name!r} is a '{adapter.manifest.task}' adapter: it does not {serves}")
        return adapter

    def classify(self, name: str, texts: list[str], notify: Notify) -> Job:
        adapter = self.get(name, "classify")
        if not 1 <= len(texts) <= self.limits.max_batch_size:
            raise UserError(f"`input` must hold 1 to {self.limits.max_batch_size} texts, got {len(texts)}")
        for number, text in enumerate(texts, 1):
            self._check_text(text, f"text {number}")
        return self._submit(Job(adapter, texts, [adapter.count_tokens(t) for t in texts], notify))

    def generate(
        self, name: str, request: dict[str, Any], max_tokens: int | None, sampling: dict[str, Any], notify: Notify
    ) -> Job:
        """Queue an answer. `request`: `instruction` (and `input`), and for chat the whole conversation (`messages`),
        put in the template the adapter was trained with as `generate` does (`chat.render_prompt`), or with `raw` the
        instruction as the whole prompt; `stream`. `sampling`: temperature, top_p, seed."""
        adapter = self.get(name, "generate")
        self._check_text(request["instruction"], "the prompt")
        self._check_text(request.get("input") or "", "the input", empty=True)
        for number, message in enumerate(request.get("messages") or [], start=1):
            self._check_text(message["content"], f"message {number}", empty=True)
        if request.get("messages"):  # the conversations `generate --file` and training accept, by their check
            chat.conversation("messages", request, chat.FORMATS[0], request=True)
        given = {"prompt": request["instruction"]} if request.get("raw") else request
        prompt = chat.render_prompt(adapter.manifest, adapter.checker, given)  # the checker: this is not the worker
        generation.check_sampling(max_tokens, sampling["temperature"], sampling["top_p"])
        default = min((adapter.manifest.generation or {}).get("max_new_tokens", 256), self.limits.max_tokens)
        if (max_tokens or 0) > self.limits.max_tokens:
            raise UserError(f"`max_tokens` {max_tokens} is over this server's cap of {self.limits.max_tokens}")
        length, context = adapter.count_tokens(prompt), adapter.base.context
        if context is not None and length >= context:
            raise UserError(f"the prompt is {length} tokens: {name} reads at most {context}, answer included")
        room = (context - length) if context else self.limits.max_tokens
        limit = min(max_tokens or default, room)
        job = Job(adapter, [prompt], [length], notify, Sampling(limit, **sampling), request.get("stream", False))
        return self._submit(job)

    def _check_text(self, text: str, what: str, empty: bool = False) -> None:
        if not empty and not text.strip():
            raise UserError(f"{what} is empty")
        if len(text) > self.limits.max_input_chars:
            raise UserError(f"{what} is {len(text)} characters, over this server's {self.limits.max_input_chars}")

    def _submit(self, job: Job) -> Job:
        job.adapter.base.submit(job)
        self.stats.count("requests")
        return job

    def models(self) -> list[dict[str, Any]]:
        return [adapter.describe() for adapter in self.adapters.values()]

    def memory(self) -> dict[str, Any]:
        """Weights in memory, measured: each base once, each adapter's own weights, and the process's RSS."""
        bases = [
            {
                "base": adapters.base_name(base.loaded.base),
                "model_class": base.model_class,
                "weight_bytes": base.weight_bytes,
                "adapters": {a.name: a.weight_bytes for a in self.adapters.values() if a.base is base},
            }
            for base in self.bases
        ]
        weights = sum(b["weight_bytes"] + sum(b["adapters"].values()) for b in bases)
        return {"bases": bases, "weight_bytes": weights, "rss_bytes": psutil.Process().memory_info().rss}


def load(paths: list[str], limits: Limits | None = None) -> Registry:
    """Every adapter checked against its base as `predict` and `generate` check it, and loaded: onto a base already
    in memory when one is the same (see the module's docstring), else onto a new one. Workers start here."""
    names = [Path(p).resolve().name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two adapters are named {twice[0]!r}: a model is named by its folder, so names must differ")
    registry = Registry({}, [], (limits or Limits()).check(), Stats())
    for path, name in zip(paths, names, strict=True):
        registry.add(path, name)
    return registry


def _measure(bases: list[Base], served: dict[str, Adapter]) -> None:
    """Bytes of the weights each base holds, split into the base's own and each adapter's (its LoRA matrices and
    its copy of the head). PEFT names an adapter's tensors with its adapter name as one part of their path."""
    for base in bases:
        owners = {a.peft_name: a for a in served.values() if a.base is base}
        base.weight_bytes = 0  # measured afresh whenever an adapter joins
        for adapter in owners.values():
            adapter.weight_bytes = 0
        whole = next((a for a in owners.values() if not methods.of(a.manifest.config).adapter), None)
        tensors = itertools.chain(base.model.named_parameters(), base.model.named_buffers())
        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            # a fully fine-tuned model owns every weight of its base
            owner = whole or next((owners[part] for part in name.split(".") if part in owners), None)
            if owner is None:
                base.weight_bytes += size
            else:
                owner.weight_bytes += size
