"""Run configuration: the task's recipe (YAML), a user's recipe on top, then explicit CLI flags; validated once."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TASKS = ("spam", "instruct")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZE = ("4bit", "8bit")
# Keys that only one task reads; a recipe for the other task may not set them.
TASK_ONLY = {"balance": "spam", "max_new_tokens": "instruct", "test_limit": "instruct"}
# Where a task's defaults differ from RunConfig's (which are spam's). recipes/<task>.yaml restates them.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "spam": {},
    "instruct": {"epochs": 2.0, "eval_batch_size": 16, "max_length": 512},
}


@dataclass
class RunConfig:
    """Everything that decides what a training run does. Field names are the recipe keys."""

    task: str = "spam"
    model: str = "openai-community/gpt2"
    data: str | None = None
    output: str | None = None
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    max_length: int = 256
    balance: bool = True
    max_new_tokens: int = 256
    test_limit: int | None = None
    precision: str = "auto"
    quantize: str | None = None
    seed: int = 123

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (check, message) per key; a value must pass its check to be accepted.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v > 0, "must be > 0"),
    "max_steps": (lambda v: v is None or v > 0, "must be > 0"),
    "batch_size": (lambda v: v > 0, "must be > 0"),
    "eval_batch_size": (lambda v: v > 0, "must be > 0"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lora_r": (lambda v: v > 0, "must be > 0"),
    "lora_alpha": (lambda v: v > 0, "must be > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "target_modules": (lambda v: v is None or len(v) > 0, "must name at least one module"),
    "max_length": (lambda v: v > 0, "must be > 0"),
    "max_new_tokens": (lambda v: v > 0, "must be > 0"),
    "test_limit": (lambda v: v is None or v > 0, "must be > 0"),
    "task": (lambda v: v in TASKS, f"must be one of {', '.join(TASKS)}"),
    "precision": (lambda v: v in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
    "quantize": (lambda v: v is None or v in QUANTIZE, f"must be null or one of {', '.join(QUANTIZE)}"),
}


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "").replace("NoneType", "null")


def validate(values: dict[str, Any], source: str, task: str | None = None) -> dict[str, Any]:
    """Check keys, types and ranges; `source` names the recipe file or 'command line' in errors."""
    hints = typing.get_type_hints(RunConfig)
    task = values.get("task", task)
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{source}: unknown key '{key}' (known: {', '.join(hints)})")
        if task in TASKS and TASK_ONLY.get(key, task) != task:
            raise UserError(f"{source}: '{key}' belongs to task {TASK_ONLY[key]}, not {task}")
        if not _type_ok(value, hints[key]):
            raise UserError(f"{source}: '{key}' must be {_type_name(hints[key])}, got {value!r}")
        if key in _RANGES and not _RANGES[key][0](value):
            raise UserError(f"{source}: '{key}' {_RANGES[key][1]}, got {value!r}")
    return values


def read_recipe(path: Path, task: str | None = None) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe ({e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys to values, got {type(values).__name__}")
    return validate(values, str(path), task)


def task_defaults(task: str) -> dict[str, Any]:
    """The built-in defaults of `task`: the keys it reads, with its own values where they differ."""
    values = {k: v for k, v in RunConfig(task=task).to_dict().items() if TASK_ONLY.get(k, task) == task}
    return values | TASK_DEFAULTS[task]


def default_recipe(task: str) -> Path:
    return RECIPES_DIR / f"{task}.yaml"


def load_config(task: str, recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Task defaults (recipes/<task>.yaml when present), then `recipe`, then `overrides` (None = not given)."""
    values = task_defaults(task)
    if default_recipe(task).is_file():
        values.update(read_recipe(default_recipe(task), task))
    if recipe is not None:
        user = read_recipe(Path(recipe), task)
        if user.get("task", task) != task:
            raise UserError(f"{recipe}: recipe is for task '{user['task']}', not '{task}'")
        values.update(user)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(validate(given, "command line", task))
    values["task"] = task
    return RunConfig(**values)


def recorded_config(manifest: dict[str, Any]) -> RunConfig:
    """The config an adapter was trained with (its manifest's), reading the data file it recorded if that is
    still there."""
    config = RunConfig(**manifest["config"])
    recorded = Path(manifest["data"]["path"])
    config.data = str(recorded) if recorded.is_file() else config.data
    return config
