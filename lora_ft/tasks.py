"""The tasks lora_ft trains. Each is one module behind one interface (`TaskModule`), named here with the few facts
that commands which only read JSON (the listing) need without importing it. The CLI, merge, the listing and the
config ask the task instead of comparing names: adding a task is its module and one entry in TASKS."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import UserError

if TYPE_CHECKING:
    from .adapters import Loaded
    from .config import RunConfig
    from .training import TrainResult


class TaskModule(Protocol):
    """What a task's module provides."""

    SAMPLE_TEXTS: list[str]  # inputs for the merge check when the adapter's own data file is gone
    COURSE_PEER: bool  # `bench` runs the course's own LoRA code on this task as a peer (course.py)
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

    def load_splits(self, config: RunConfig, fractions: tuple[float, ...] = ...) -> tuple[Path, Any]:
        """The data file `config` names (or the default one), read and split as `config` (seed, data) and
        `fractions` fix them (by default the task's own): its bad rows are one-line errors."""

    def score_test(self, loaded: Loaded, test: Any, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """A loaded adapter's test metrics on `test`, and each example's scores (the arrays `PAIRED` names)."""

    def check_texts(self, manifest: dict[str, Any], count: int) -> list[str]:
        """The first `count` inputs of the adapter's own test split, as the model reads them."""

    def summary(self, manifest: dict[str, Any]) -> list[str]:
        """The lines that report a finished run to a person."""

    def bench_data(self, train: Any, tokenizer: Any, config: RunConfig, pad_to_longest: bool) -> tuple[Any, Any]:
        """`bench`'s training rows (tokenized, with labels) and their collator: padded per batch as training pads
        them, or every row to the longest (the naive baseline)."""

    def bench_trainer(self, model: Any, pad_to_longest: bool) -> type:
        """The Trainer class `bench` times on `bench_data`'s rows: as the task trains, or the naive baseline's."""


@dataclass(frozen=True)
class Task:
    name: str  # the command, and `task` in recipes and manifests
    module: str  # the module that implements it (a TaskModule), imported only when it is used
    help: str  # one line, for the command list
    key_metric: str  # the test metric shown for an adapter (listing, inspect)
    model_class: str  # the transformers Auto class of its base, and of a merged export
    serves: str  # what `serve` answers with its adapters: "classify" (/v1/classify) or "generate" (completions)
    peft_task_type: str  # PEFT's TaskType for its adapters

    def code(self) -> TaskModule:
        return importlib.import_module(self.module)  # type: ignore[return-value]


TASKS = {
    "spam": Task(
        "spam",
        "lora_ft.classify",
        "train a LoRA text classifier (SMS spam vs. ham by default)",
        "accuracy",
        "AutoModelForSequenceClassification",
        "classify",
        "SEQ_CLS",
    ),
    "instruct": Task(
        "instruct",
        "lora_ft.instruct",
        "instruction-tune with LoRA (TRL SFTTrainer)",
        "rouge_l",
        "AutoModelForCausalLM",
        "generate",
        "CAUSAL_LM",
    ),
    "prefer": Task(
        "prefer",
        "lora_ft.prefer",
        "preference-tune with LoRA (TRL DPOTrainer), from an instruct adapter or the base",
        "reward_accuracy",
        "AutoModelForCausalLM",
        "generate",
        "CAUSAL_LM",
    ),
}
NAMES = tuple(TASKS)


def same_kind(one: str, other: str) -> bool:
    """Adapters of the two tasks load and answer alike (a `prefer` adapter is an instruction-following causal LM, as
    an `instruct` one is): same Auto class, same answers, same PEFT task type."""
    a, b = get(one), get(other)
    return (a.model_class, a.serves, a.peft_task_type) == (b.model_class, b.serves, b.peft_task_type)


def get(name: Any, where: str = "task") -> Task:
    """The task called `name`; `where` names what gave it, in the error."""
    if name not in TASKS:
        raise UserError(f"{where}: unknown task {name!r} (known: {', '.join(NAMES)})")
    return TASKS[name]
