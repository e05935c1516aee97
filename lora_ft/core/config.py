"""Run configuration: the task's recipe (YAML), a user's recipe on top, then explicit CLI flags; validated once."""

from __future__ import annotations

import dataclasses
import logging
import math
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import catalog, files, registry
from .errors import UserError
from .method_table import METHODS as METHOD_TABLE

log = logging.getLogger("lora_ft")

RECIPES_DIR = catalog.RECIPES_DIR  # the recipes shipped in the package; recipes/ in a checkout links to them
TASKS = registry.NAMES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb")
DEFAULT_MODEL = "openai-community/gpt2"
FALLBACK_MODEL = "smollm2-135m"  # trained when no model is named and GPT-2 cannot be had
# What each task trains on the fallback model (chosen on val; recipes/<task>-smollm2.yaml restates it). A user's
# recipe and flags still go on top.
FALLBACK_RECIPES: dict[str, dict[str, Any]] = {
    "spam": {"model": FALLBACK_MODEL, "epochs": 1.0},
    "instruct": {"model": FALLBACK_MODEL, "epochs": 1.0, "test_limit": 20},
    "prefer": {"model": FALLBACK_MODEL, "epochs": 0.25, "test_limit": 20},
}
# The architectures `bench --model` builds with random weights (no download): each transformers config class and
# the keys that make it the named model. The vocabulary is the tokenizer's (GPT-2's unless `--tokenizer`).
BENCH_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {}),  # GPT2Config's defaults are GPT-2 124M's
    "smollm2-135m": (
        "LlamaConfig",
        {
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        },
    ),
}  # fmt: skip
QUANTIZE = ("4bit", "8bit")
METHODS = tuple(METHOD_TABLE)  # lora, dora, ia3, vera, full: what each is and can do in method_table
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
# TRL 1.16's DPO losses on (chosen, rejected) pairs; its `sft` (no preference) is left out. TRL has no stable
# reference-free loss (ORPO, CPO and SimPO are in trl.experimental): every one here compares with the reference.
DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip


def setting(
    default: Any,
    help: str,
    *,
    check: tuple[typing.Callable[[Any], bool], str] | None = None,
    choices: tuple[str, ...] | None = None,
    task: str | tuple[str, ...] | None = None,
    flag: str | None = None,
    per_task: dict[str, Any] | None = None,
    internal: bool = False,
    required: bool = False,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """A RunConfig field with everything about it in one place: its default (and where a task's differs, `per_task`),
    the help text of its flag (and a shorter `flag` beside the one named after it), the check a value must pass (a test
    and what it says), its `choices`, the `task` (or tasks) that read it (None: every task), and whether it is
    `internal` (recorded by a run, set by no recipe or flag); for a command's options (`commands`), whether its flag is
    `required`, its `metavar`, and whether it is a `secret` (an error never shows its value). None passes every check:
    whether a field may be None is its type's business."""
    if choices is not None:
        check = (choices.__contains__, f"must be {'null or ' if default is None else ''}one of {', '.join(choices)}")
    tasks_ = (task,) if isinstance(task, str) else task
    meta = {"help": help, "check": check, "choices": choices, "task": tasks_, "flag": flag, "per_task": per_task or {}}
    meta |= {"internal": internal, "required": required, "metavar": metavar, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)


POSITIVE = (lambda v: v > 0, "must be > 0")
FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")


@dataclass
class RunConfig:
    """Everything that decides what a training run does. Field names are the recipe keys; the command-line flags,
    their help and the recipe checks are generated from the fields (see `setting`)."""

    task: str = setting("spam", "the task", choices=TASKS, internal=True)
    model: str | None = setting(
        None,
        "Hub id, alias (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), folder, or smollm2-135m (default: GPT-2; "
        "the bundled SmolLM2-135M with recipes/<task>-smollm2.yaml when GPT-2 cannot be had)",
    )
    data: str | None = setting(None, "data file (default: $LORA_FT_DATA_DIR, then the copy shipped with lora_ft)")
    output: str | None = setting(None, "adapter folder to write (default: adapters/<task>-<model>-<timestamp>)")
    epochs: float = setting(3.0, "training epochs", check=POSITIVE, per_task={"instruct": 2.0, "prefer": 1.0})
    max_steps: int | None = setting(None, "stop after this many optimiser steps", check=POSITIVE)
    batch_size: int = setting(8, "training batch size (per process)", check=POSITIVE)
    eval_batch_size: int = setting(
        32, "evaluation (and generation) batch size", check=POSITIVE, per_task={"instruct": 16, "prefer": 16}
    )
    lr: float = setting(5e-4, "learning rate", check=POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", check=(lambda v: v >= 0, "must be >= 0"))
    warmup_ratio: float = setting(0.0, "share of steps spent warming up the learning rate", check=FRACTION)
    method: str = setting(
        "lora",
        "what to train: lora, dora (weight-decomposed LoRA), ia3 (learned scaling vectors), vera (shared random "
        "matrices, learned scaling), or full (every weight: fine-tuning for reference, saved as a whole model)",
        choices=METHODS,
    )
    lora_r: int = setting(16, "LoRA rank (lora, dora, vera)", check=POSITIVE)
    lora_alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", check=POSITIVE)
    lora_dropout: float = setting(
        0.0, "dropout on the LoRA input (lora, dora, vera)", check=FRACTION, per_task={"instruct": 0.05}
    )
    use_rslora: bool = setting(
        False, "rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (lora, dora)"
    )
    init_lora_weights: str = setting(
        "default",
        "how LoRA's matrices start (lora, dora): default (B = 0), gaussian, pissa or olora (from the weights' "
        "singular vectors; the saved adapter is converted to plain LoRA of rank 2r), loftq (CUDA only)",
        choices=LORA_INITS,
    )
    model_dropout: float | None = setting(
        0.0, "the base model's own dropout (GPT-2 ships 0.1; null: as the model ships)", check=FRACTION
    )
    target_modules: list[str] | None = setting(
        None, "module names to adapt (default: per architecture)", check=(bool, "must name at least one module")
    )
    max_length: int = setting(
        256,
        "longest input in tokens; longer ones are truncated (spam) or left out (instruct, prefer)",
        check=POSITIVE,
        per_task={"instruct": 512, "prefer": 512},
    )
    balance: bool = setting(True, "undersample larger classes to the smallest", task="spam")
    max_new_tokens: int = setting(
        256,
        "longest generated response in tokens (generation stops earlier at EOS)",
        check=POSITIVE,
        task=("instruct", "prefer"),
    )
    max_eval_samples: int | None = setting(
        None,
        "evaluate on at most N val examples, a sample the seed fixes (large data: shorter evaluations)",
        check=POSITIVE,
    )
    test_limit: int | None = setting(
        None, "generate for only the first N test examples", check=POSITIVE, task=("instruct", "prefer")
    )
    from_adapter: str | None = setting(
        None,
        "instruct adapter to continue: its base and method, and the reference policy (frozen); default: new LoRA on "
        "the base, the base the reference",
        task="prefer",
        flag="--from",
    )
    beta: float = setting(
        0.1, "DPO's beta: higher keeps the policy nearer the reference", check=POSITIVE, task="prefer"
    )
    loss_type: str = setting("sigmoid", "TRL's DPO loss (sigmoid: the DPO paper's)", choices=DPO_LOSSES, task="prefer")
    precision: str = setting(
        "auto",
        "auto: bf16 autocast where the hardware runs bf16 natively, fp16 on older GPUs, else fp32",
        choices=PRECISIONS,
    )
    quantize: str | None = setting(None, "QLoRA: hold the base in 4-bit NF4 or 8-bit (bitsandbytes)", choices=QUANTIZE)
    activation_checkpointing: bool = setting(
        False, "keep only each block's input and recompute the rest in backward: less memory, slower steps"
    )
    compile: bool = setting(
        False, "torch.compile the transformer blocks (pays on GPUs; on a small CPU no faster, after a compile)"
    )
    seed: int = setting(
        123,
        "seed for the split, the initialisation and the data order",
        check=(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),  # numpy's and torch's seeds
    )
    report_to: str = setting(
        "none", "also log training to TensorBoard (in the adapter folder) or W&B", choices=REPORT_TO
    )
    model_fallback: str | None = setting(None, "why the model is the fallback one, when it is", internal=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings(task: str | None = None, internal: bool = False) -> list[dataclasses.Field]:
    """RunConfig's fields that `task` reads (every task's, for None), without the internal ones unless asked."""
    return [
        f
        for f in dataclasses.fields(RunConfig)
        if (task is None or f.metadata["task"] is None or task in f.metadata["task"])
        and (internal or not f.metadata["internal"])
    ]


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
    fields = {f.name: f for f in settings()}
    task = values.get("task", task)
    for key, value in values.items():
        if key == "task":
            field = dataclasses.fields(RunConfig)[0]
        elif key not in fields:
            raise UserError(f"{source}: unknown key {_shown(key)} (known: {', '.join(fields)})")
        else:
            field = fields[key]
        owners = field.metadata["task"]
        if task in TASKS and owners is not None and task not in owners:
            raise UserError(
                f"{source}: '{key}' belongs to task{'s' * (len(owners) > 1)} {' and '.join(owners)}, not {task}"
            )
        check_value(source, key, value, field, hints[key])
    return values


def check_value(source: str, key: str, value: Any, field: dataclasses.Field, hint: Any, flag: bool = False) -> None:
    """One setting's value checked: its type, a finite number, its field's check. Errors name `source` and the key
    (`flag`: the key alone, as `name`, which the CLI shows as --name)."""
    name = f"`{key}`" if flag else f"{source}: '{key}'"
    if not _type_ok(value, hint):
        raise UserError(f"{name} must be {_type_name(hint)}, got {_shown(value)}")
    if not _sane_number(value):
        raise UserError(f"{name} must be a finite number under {LARGEST:,}, got {_shown(value)}")
    test, must = field.metadata["check"] or (None, "")
    if value is not None and test is not None and not test(value):
        raise UserError(f"{name} {must}" + ("" if field.metadata.get("secret") else f", got {_shown(value)}"))


LARGEST = 2**32  # no setting means anything this large (seeds go up to it); inf and nan mean nothing anywhere


def _sane_number(value: Any) -> bool:
    """Every numeric setting is finite and below LARGEST in size: checked here, once for all of them, so that
    `--lr inf` or `lora_alpha: 1e20` stop before anything loads, not as a failure after training."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return math.isfinite(value) and abs(value) < LARGEST


def _shown(value: Any) -> str:
    """A value as an error shows it: repr, so one line whatever it holds (a key with a newline, a NUL), and cut
    short, so that a YAML alias bomb or a 4,000-digit number is not a megabyte-long message."""
    shown = _SHORT.repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel = 80, 80, 40, 3


def read_recipe(path: Path, task: str | None = None) -> dict[str, Any]:
    try:
        text = files.read_bytes(path, files.MAX_RECORD_BYTES, "recipe").decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe ({e})") from None
    return parse_recipe(text, str(path), task)


def parse_recipe(text: str, source: str, task: str | None = None) -> dict[str, Any]:
    """A recipe's YAML text, checked (`source` names it in errors)."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{source}: not valid YAML (nested too deeply)") from None
    except (ValueError, AttributeError, KeyError) as e:  # PyYAML's constructors on a scalar it cannot convert
        raise UserError(f"{source}: not valid YAML (a value cannot be read: {_shown(str(e))})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{source}: a recipe is a mapping of keys to values, got {type(values).__name__}")
    return validate(values, source, task)


def task_defaults(task: str) -> dict[str, Any]:
    """The built-in defaults of `task`: the keys it reads, with its own values where they differ."""
    return {"task": task} | {f.name: f.metadata["per_task"].get(task, f.default) for f in settings(task)}


def default_recipe(task: str) -> Path:
    return RECIPES_DIR / f"{task}.yaml"


def load_config(task: str, recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Task defaults (recipes/<task>.yaml when present), then `recipe` (a file, or a shipped recipe's name), then
    `overrides` (None = not given). When none of them names a model and GPT-2 cannot be had, the fallback model's
    recipe goes under `recipe`."""
    values = task_defaults(task)
    if default_recipe(task).is_file():
        values.update(read_recipe(default_recipe(task), task))
    user: dict[str, Any] = {}
    if recipe is not None:  # a file, or the name of a shipped recipe (`spam-qlora`)
        user = read_recipe(catalog.find(recipe), task)
        if user.get("task", task) != task:
            raise UserError(f"{recipe}: recipe is for task '{user['task']}', not '{task}'")
    given = validate({k: v for k, v in (overrides or {}).items() if v is not None}, "command line", task)
    values = choose_model(task, values, user | given)
    values["task"] = task
    return RunConfig(**values)


def choose_model(task: str, defaults: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """`defaults` with the `chosen` values on top; when no model is named there, GPT-2, or when GPT-2 cannot be had
    (not cached, and offline or the Hub unreachable) the fallback model with its recipe, saying so once."""
    if chosen.get("model", ...) is None:  # `model: null` in a recipe asks for the default, as leaving it out does
        chosen = {k: v for k, v in chosen.items() if k != "model"}
    values = defaults | chosen
    if values.get("model") is not None or values.get("from_adapter"):  # continuing an adapter: its base (prefer)
        return values
    why = gpt2_unavailable()
    if why is None:
        return values | {"model": DEFAULT_MODEL}
    recipe = fallback_recipe(task)
    log.warning("%s; training the bundled SmolLM2-135M instead (%s) — pass --model gpt2 to insist", why, recipe.name)
    fallback = FALLBACK_RECIPES.get(task, {"model": FALLBACK_MODEL})
    return defaults | fallback | chosen | {"model_fallback": why}


def with_model(config: RunConfig) -> RunConfig:
    """`config` as it is when it names a model; else with GPT-2 or the fallback model (not its recipe: a config
    built in Python says what it wants)."""
    if config.model is not None or config.from_adapter:
        return config
    chosen = choose_model(config.task, {}, {})
    return dataclasses.replace(config, model=chosen["model"], model_fallback=chosen.get("model_fallback"))


def gpt2_unavailable() -> str | None:
    """Why GPT-2 cannot be trained here, or None when it can: it is in the Hub cache, or the Hub can be reached."""
    if files.hub_cached(DEFAULT_MODEL, ("config.json", "model.safetensors")):
        return None
    if files.offline():
        return "GPT-2 is not reachable (offline mode is on, HF_HUB_OFFLINE, and it is not in the Hub cache)"
    if not files.hub_reachable():
        return f"GPT-2 is not reachable ({files.hub_endpoint()} cannot be reached and it is not in the Hub cache)"
    return None


def fallback_recipe(task: str) -> Path:
    return RECIPES_DIR / f"{task}-smollm2.yaml"
