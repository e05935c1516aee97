"""What a task's module provides (`TaskModule`; tests/test_architecture.py checks each registered module's members
and signatures against it), and what is built from those members alone: an adapter scored again on its rebuilt test
split (`rescore`). It sits below the task modules, so that one of them can use it on itself; a task's module is found
by name through `task_code`, above them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..core import files
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..data import SPLITS
from ..engine.adapters import Loaded, TrainResult


class TaskModule(Protocol):
    """What a task's module provides."""

    SAMPLE_TEXTS: list[str]  # inputs for the merge check when the adapter's own data file is gone
    COURSE_PEER: bool  # `bench` runs the course's own LoRA code on this task as a peer (bench/course.py)
    EVAL_COLUMNS: tuple[str, ...]  # the test metrics `eval` shows
    PAIRED: dict[str, tuple[str, tuple[str, ...]]]  # `eval A B`: metric -> (its paired test, per-example columns)

    def train(self, config: RunConfig, overwrite: bool = False, resume: Path | None = None) -> TrainResult: ...

    def load(
        self,
        adapter: str | Path,
        base: Any = None,
        force: bool = False,
        full_precision: bool = False,
        onto: Loaded | None = None,
        name: str = "default",
    ) -> Loaded:
        """The adapter on its base, in eval mode (with `onto`: added to that adapter's model, sharing its base)."""

    def load_splits(self, config: RunConfig, fractions: tuple[float, float, float] = ...) -> tuple[Path, Any]:
        """The data file `config` names (or the default one), read and split as `config` (seed, data) and
        `fractions` fix them (by default the task's own): its bad rows are one-line errors."""

    def score_test(self, loaded: Loaded, test: Any, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """A loaded adapter's test metrics on `test`, and each example's scores (the arrays `PAIRED` names)."""

    def check_texts(self, manifest: Manifest, count: int) -> list[str]:
        """The first `count` inputs of the adapter's own test split, as the model reads them."""

    def summary(self, manifest: Manifest, folder: Path) -> list[str]:
        """The lines that report a finished run (its adapter in `folder`) to a person."""

    def bench_data(self, train: Any, tokenizer: Any, config: RunConfig, pad_to_longest: bool) -> tuple[Any, Any]:
        """`bench`'s training rows (tokenized, with labels) and their collator: padded per batch as training pads
        them, or every row to the longest (the naive baseline)."""

    def bench_trainer(self, model: Any, pad_to_longest: bool) -> type:
        """The Trainer class `bench` times on `bench_data`'s rows: as the task trains, or the naive baseline's."""


class Classifier(TaskModule, Protocol):
    """What a task that serves "classify" (`tasks.Task.serves`) provides besides: `predict` and `serve`'s labels."""

    def predict(self, adapter: str | Path, texts: list[str], batch_size: int = 32, force: bool = False) -> list[Any]:
        """Each text's label and score, and whether it was cut at the adapter's max_length."""

    def predict_stream(
        self, adapter: str | Path, texts: Iterable[str], batch_size: int = 32, force: bool = False
    ) -> Iterator[Any]:
        """`predict` for texts read as they come, answered in order a chunk at a time (bounded memory)."""

    def classify_batch(self, model: Any, tokenizer: Any, texts: list[str], names: list[str], max_length: int) -> list:
        """`texts` labelled in one forward pass by an adapter already loaded (`serve`'s batches)."""

    def tokenize(self, dataset: Any, tokenizer: Any, max_length: int) -> Any:
        """A dataset's `text` column tokenized as training and `predict` read it (`bench --inference` times it)."""

    def predict_logits(self, model: Any, tokenizer: Any, dataset: Any, batch_size: int, desc: str = ...) -> Any:
        """Logits for every row of a tokenized dataset, in order, as `predict` batches them."""


class Generator(TaskModule, Protocol):
    """What a task that serves "generate" provides besides: `generate`'s answers (`chat` and `serve` load it and
    generate with `generation`)."""

    def respond(
        self,
        adapter: str | Path,
        requests: list[dict[str, Any]],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int | None = None,
        seed: int = 0,
        force: bool = False,
    ) -> list[Any]:
        """Answers from a trained adapter, in the template it was trained with."""


KINDS: dict[str, type] = {"classify": Classifier, "generate": Generator}  # by `tasks.Task.serves`


@dataclass
class Evaluation:
    """An adapter's test metrics as recomputed now, its manifest, and what each test example scored (the task's
    per-example arrays, in test-split order), which the paired tests resample."""

    adapter: str
    metrics: dict[str, Any]
    manifest: Manifest
    scores: dict[str, np.ndarray]


def rescore(adapter: str | Path, manifest: Manifest, task: TaskModule, force: bool = False) -> Evaluation:
    """Rebuild the adapter's test split from its manifest (the same data file, byte for byte, and the same split
    sizes, or refused) and score the adapter on it with its task's own metrics (`task`: the manifest task's module)."""
    data_path, splits = task.load_splits(manifest.run_config, manifest.fractions)
    if files.sha256_file(data_path) != manifest.data["sha256"]:
        raise UserError(f"{data_path}: not the data this adapter was trained on (sha256 differs from the manifest)")
    sizes = {split: len(splits[split]) for split in SPLITS}
    if sizes != manifest.data["split_sizes"]:
        raise UserError(f"{adapter}: rebuilt split sizes {sizes} differ from the manifest's")
    loaded = task.load(adapter, force=force)
    metrics, scores = task.score_test(loaded, splits["test"], manifest.run_config)
    return Evaluation(str(adapter), metrics, manifest, scores)
