"""The tasks lora_ft trains, by name, with the few facts that commands which only read JSON (the listing, the
config, the parser) need without importing a task's module. A task's code is reached through `task_code.get`, which
loads the module named here; what that module provides is `task_api.TaskModule`. The CLI, merge, serve, bench and the
listing ask the task instead of comparing names: adding a task is its module and one entry in TASKS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Task:
    name: str  # the command, and `task` in recipes and manifests
    module: str  # the module that implements it (a task_api.TaskModule), imported by task_code when used
    help: str  # one line, for the command list
    key_metric: str  # the test metric shown for an adapter (listing, inspect)
    model_class: str  # the transformers Auto class of its base, and of a merged export
    serves: str  # what `serve` answers with its adapters: "classify" (/v1/classify) or "generate" (completions)
    peft_task_type: str  # PEFT's TaskType for its adapters
    gguf: bool  # `merge --gguf`/`--gguf-adapter` can export it (llama.cpp runs language models, with no class head)


TASKS = {
    "spam": Task(
        "spam",
        "lora_ft.tasks.classify",
        "train a LoRA text classifier (SMS spam vs. ham by default)",
        "accuracy",
        "AutoModelForSequenceClassification",
        "classify",
        "SEQ_CLS",
        False,
    ),
    "instruct": Task(
        "instruct",
        "lora_ft.tasks.instruct",
        "instruction-tune with LoRA (TRL SFTTrainer)",
        "rouge_l",
        "AutoModelForCausalLM",
        "generate",
        "CAUSAL_LM",
        True,
    ),
    "prefer": Task(
        "prefer",
        "lora_ft.tasks.prefer",
        "preference-tune with LoRA (TRL DPOTrainer), from an instruct adapter or the base",
        "reward_accuracy",
        "AutoModelForCausalLM",
        "generate",
        "CAUSAL_LM",
        True,
    ),
}
NAMES = tuple(TASKS)


def same_kind(one: str, other: str) -> bool:
    """Adapters of the two tasks load and answer alike (a `prefer` adapter is an instruction-following causal LM, as
    an `instruct` one is): same Auto class, same answers, same PEFT task type."""
    a, b = get(one), get(other)
    return (a.model_class, a.serves, a.peft_task_type) == (b.model_class, b.serves, b.peft_task_type)


def serving(kind: str) -> Task:
    """The task whose adapters the commands of one kind load (`predict`: "classify"; `generate`, `chat`:
    "generate"): the first registered that serves it. Adapters of the others of its kind load alike (`same_kind`)."""
    return next(task for task in TASKS.values() if task.serves == kind)


def get(name: Any, where: str = "task") -> Task:
    """The task called `name`; `where` names what gave it, in the error."""
    if name not in TASKS:
        raise UserError(f"{where}: unknown task {name!r} (known: {', '.join(NAMES)})")
    return TASKS[name]
