"""The adapter folder: PEFT's adapter and the tokenizer saved apart from the base, the manifest (lora_ft.json) written
and read, the adapter loaded back onto its base (checked to be the one it was trained on), and the listing."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import platform
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..core import interop, registry
from ..core.errors import UserError
from ..core.files import MANIFEST_NAME, sha256_file
from ..core.manifest import Manifest
from ..core.report import Listed
from . import methods
from .runs import ADAPTERS_DIR, PARTIAL, RUN_RECORD, newest_checkpoint, output_of, read_run_record, running
from .runs import find_run as find_run  # the Python API's name for it, from before runs.py

_PACKAGES = ("lora_ft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def default_output(task: str, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return ADAPTERS_DIR / f"{task}-{model_name}-{stamp}"


def save_adapter(model: Any, tokenizer: Any, folder: Path, state: dict[str, Any] | None = None, **how: Any) -> None:
    """PEFT's adapter files and the tokenizer; the base is not written (a fully fine-tuned model, not a PEFT one, is
    written whole). `state`: the whole model's weights, where the model's own are sharded (PEFT picks the adapter's
    out of it); `how`: more of `save_pretrained`'s arguments (methods.save_kwargs)."""
    model.save_pretrained(folder, state_dict=state, **how)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; lora_ft.json says more
    interop.save_tokenizer(tokenizer, folder)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def write_manifest(folder: Path, manifest: Manifest) -> None:
    manifest.write(folder)


def read_manifest(folder: str | Path, adapter: bool = True) -> Manifest:
    """The folder's manifest. With `adapter`, the folder must also hold PEFT's adapter (not a merged export)."""
    manifest = Manifest.read(folder)
    if adapter and is_whole_model(manifest):
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"{folder}: config.json is missing (a fully fine-tuned model is saved whole)")
    elif adapter and not (Path(folder) / "adapter_config.json").is_file():
        if manifest.merge is not None:
            raise UserError(f"{folder}: a merged export, not an adapter (load it with transformers directly)")
        raise UserError(f"{folder}: adapter_config.json is missing")
    return manifest


def is_whole_model(manifest: Manifest) -> bool:
    """A fully fine-tuned model (`method` full), saved whole rather than as an adapter apart from its base."""
    return manifest.merge is None and not methods.of(manifest.config).adapter


@dataclass
class Loaded:
    """An adapter on its base, in eval mode; `base` describes the base actually loaded, and `base_mismatches`
    how it differs from the one the adapter was trained on (empty unless `force` accepted a different base)."""

    model: Any
    tokenizer: Any
    manifest: Manifest
    base: dict[str, Any]
    base_mismatches: list[str]


@dataclass
class TrainResult:
    """What a task's `train` returns: the adapter folder, its manifest, the trained model (a PeftModel)."""

    adapter_dir: Path
    manifest: Manifest
    model: Any


def loader(task: str, load_base: Callable[..., Any]) -> Callable[..., Loaded]:
    """A task's `load` (task_api.TaskModule.load): its adapters on the bases `load_base` builds (`load_with_base`)."""

    def load(
        adapter: str | Path,
        base: Any = None,
        force: bool = False,
        full_precision: bool = False,
        onto: Loaded | None = None,
        name: str = "default",
    ) -> Loaded:
        """Base (as the manifest names it, or `base`, a models.ModelSource) + adapter, in eval mode, with the
        adapter's tokenizer. A QLoRA adapter goes on its base quantised as in training, or in float32 with
        `full_precision`. With `onto`, added to that loaded adapter's model (and base) as PEFT adapter `name` (see
        `load_with_base`)."""
        return load_with_base(adapter, task, load_base, base, force, full_precision, onto, name)

    return load


def load_with_base(
    adapter: str | Path,
    task: str,
    load_base: Callable[..., Any],
    source: Any = None,
    force: bool = False,
    full_precision: bool = False,
    onto: Loaded | None = None,
    name: str = "default",
) -> Loaded:
    """The adapter on a base built by `load_base(source, tokenizer, manifest, quantize, precision)`: the base the
    manifest names, or `source`, quantised as in training (QLoRA), or in float32 with `full_precision`. A base that
    is not the one the adapter was trained on (architecture, size, weights) is refused unless `force`.
    With `onto` (an adapter already loaded on the base this one names), no base is loaded: the adapter is checked
    against `onto`'s base and added to its model as PEFT adapter `name`, sharing that base (`serve`)."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from .hardware import base_is_bf16, skip_input_casts
    from .models import ModelSource, base_mismatches, describe_base, source_from_manifest

    manifest = read_manifest(adapter)
    if manifest.task not in registry.TASKS or not registry.same_kind(manifest.task, task):
        raise UserError(f"{adapter}: a '{manifest.task}' adapter, not a {task} one")
    if not is_whole_model(manifest):
        check_adapter_config(adapter, manifest)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    check_template(adapter, tokenizer, manifest)
    if is_whole_model(manifest):  # its own weights: nothing to check them against, nothing to share
        own = ModelSource(str(adapter), "local", str(Path(adapter).resolve()))
        whole = load_base(own, tokenizer, manifest, None, "fp32")
        return Loaded(whole.eval(), tokenizer, manifest, manifest.base, [])
    source = source or source_from_manifest(manifest.base)
    if onto is None:
        # as trained: a bf16 adapter on a bf16 base (emulated where bf16 is not native: slower, the same numbers)
        quantize, precision = (None, "fp32") if full_precision else manifest.as_trained
        base = load_base(source, tokenizer, manifest, quantize, precision)
        info = describe_base(source, base)
    else:
        info = onto.base
    mismatches = base_mismatches(manifest.base, info)
    if mismatches and not force:
        raise UserError(
            f"{adapter}: {source.spec} is not the base it was trained on ({'; '.join(mismatches)}); "
            "pass `force` to use it anyway"
        )
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():  # PEFT would fall back to a pickled adapter_model.bin, which lora_ft never loads
        pickled = " (its adapter_model.bin is pickled: lora_ft loads safetensors only)"
        raise UserError(f"{weights}: missing{pickled if (Path(adapter) / 'adapter_model.bin').exists() else ''}")
    try:
        if onto is None:
            model = PeftModel.from_pretrained(base, adapter, adapter_name=name).eval()
        else:
            model = onto.model
            model.load_adapter(adapter, adapter_name=name)
    except SafetensorError as e:
        raise UserError(f"{weights}: corrupt or incomplete ({str(e).splitlines()[0]})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # what check_adapter_config leaves to PEFT
        raise UserError(f"{Path(adapter) / ADAPTER_CONFIG}: PEFT cannot load it ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:  # tensor shapes that do not fit, once --force let a different base through
        lines = [line.strip() for line in str(e).splitlines()]
        why = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise UserError(f"{adapter}: its weights do not fit {source.spec} ({why})") from None
    if base_is_bf16(model):
        skip_input_casts(model)
    return Loaded(model, tokenizer, manifest, info, mismatches)


ADAPTER_CONFIG = "adapter_config.json"
CONFIG_SHA256 = "adapter_config_sha256"  # in the manifest's `lora` section: the file as training wrote it


def record_adapter_config(folder: Path, manifest: Manifest) -> None:
    """Record in the manifest the sha256 of the adapter_config.json just saved (none for a whole model)."""
    if (folder / ADAPTER_CONFIG).is_file():
        manifest.lora[CONFIG_SHA256] = sha256_file(folder / ADAPTER_CONFIG)


def check_adapter_config(folder: str | Path, manifest: Manifest) -> None:
    """`adapter_config.json` is the adapter the manifest describes. PEFT builds the layers from that file, so a hand
    edit would load another adapter than the one trained (other layers, another scale), or fail deep inside PEFT.
    Every field PEFT declares must have its declared type and every field the manifest records must agree, each
    refused by name; then the whole file must be the one training wrote (its sha256), where the manifest has it."""
    path = Path(folder) / ADAPTER_CONFIG
    found = _json_object(path)
    config_class = _peft_config_class(path, found.get("peft_type"))
    for field, value in found.items():
        expected = _declared_type(config_class, field)
        if expected is not None and not _has_type(expected, value):
            raise UserError(f"{path}: {_brief(field)} is {_brief(value)}, not {_type_name(expected)}")
    effective = _defaults(config_class) | found
    for field, recorded in _recorded_fields(manifest).items():
        if not _agree(effective.get(field), recorded):
            raise UserError(
                f"{path}: {_brief(field)} is {_brief(effective.get(field))}, but the adapter was trained with "
                f"{_brief(recorded)} ({MANIFEST_NAME}): restore it"
            )
    recorded_sha = (manifest.lora or {}).get(CONFIG_SHA256)
    if recorded_sha is not None and sha256_file(path) != recorded_sha:
        why = f"its sha256 is not the one {MANIFEST_NAME} records"
        raise UserError(f"{path}: changed since training ({why}): restore it")


def _json_object(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep, unreadable
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: a JSON {type(found).__name__}, not an object")
    return found


def _peft_config_class(path: Path, peft_type: Any) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UserError(f'{path}: "peft_type" is {_brief(peft_type)}, not one of PEFT\'s (LORA, IA3, VERA, ...)')
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


@functools.cache
def _declared_type(config_class: type, field: str) -> Any:
    """The field's annotation in PEFT's config dataclass, or None for a field PEFT does not declare."""
    return typing.get_type_hints(config_class).get(field)


@functools.cache
def _type_checker(expected: Any) -> Any:
    """pydantic's validator for a typing annotation, or None where pydantic cannot build one (PEFT's own classes:
    PEFT checks those as it loads)."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(expected)
    except Exception:  # pydantic's schema errors have several types; any one means "cannot check"
        return None


def _has_type(expected: Any, value: Any) -> bool:
    from pydantic import ValidationError

    checker = _type_checker(expected)
    if checker is None:
        return True
    try:
        checker.validate_python(value, strict=True)  # strict: "8" is not an int, 1 is not a bool
    except (ValidationError, RecursionError):
        return False
    return True


def _type_name(expected: Any) -> str:
    """An annotation as a reader knows it: "int", "Optional[list[str]]"."""
    name = expected.__name__ if isinstance(expected, type) else str(expected)
    return name.replace("typing.", "")


def _defaults(config_class: type) -> dict[str, Any]:
    """The values PEFT gives the fields a file leaves out."""
    missing, found = dataclasses.MISSING, {}
    for field in dataclasses.fields(config_class):
        if field.default is not missing or field.default_factory is not missing:
            found[field.name] = field.default if field.default is not missing else field.default_factory()
    return found


def _recorded_fields(manifest: Manifest) -> dict[str, Any]:
    """What the manifest says adapter_config.json holds: the PEFT type, task type, targets and the rank and scale."""
    lora, config = manifest.lora or {}, manifest.config or {}
    recorded = {
        "peft_type": lora.get("peft_type"),
        "task_type": registry.get(manifest.task).peft_task_type,
        "target_modules": lora.get("target_modules"),
        "fan_in_fan_out": lora.get("fan_in_fan_out"),
        "modules_to_save": lora.get("modules_to_save"),
    }
    if lora.get("peft_type") == "VERA":
        recorded["r"] = config.get("lora_r")
    if lora.get("peft_type") == "LORA" and isinstance(lora.get("r"), int) and lora["r"] > 0:
        recorded |= _lora_scale(lora, config.get("lora_alpha"))
        recorded |= {"use_rslora": lora.get("use_rslora"), "use_dora": lora.get("method") == "dora"}
        recorded |= {"rank_pattern": {}, "alpha_pattern": {}}  # lora_ft gives every module the same rank and scale
    return {field: value for field, value in recorded.items() if value is not None}


def _lora_scale(lora: dict[str, Any], alpha: Any) -> dict[str, Any]:
    """The rank and alpha a LoRA adapter is saved with. PiSSA and OLoRA are saved converted to a plain LoRA of twice
    the rank (methods.finish_conversion), with alpha grown to keep the scale (alpha / r, or alpha / sqrt(r) with
    rsLoRA)."""
    if not isinstance(alpha, (int, float)):
        return {}
    grow = 2 if lora.get("init_lora_weights") in methods.REWRITES_BASE else 1
    return {"r": lora["r"] * grow, "lora_alpha": alpha * (math.sqrt(grow) if lora.get("use_rslora") else grow)}


def _agree(found: Any, recorded: Any) -> bool:
    """Lists of names compare as sets (PEFT writes them in any order; none is an empty list), numbers by value."""
    if isinstance(recorded, list) and (found is None or isinstance(found, list)):
        return {repr(v) for v in found or ()} == {repr(v) for v in recorded}
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(found, numbers) and not isinstance(found, bool):
        return not isinstance(recorded, bool) and math.isclose(found, recorded, rel_tol=1e-9)
    return type(found) is type(recorded) and found == recorded


def _brief(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_template(folder: str | Path, tokenizer: Any, manifest: Manifest) -> None:
    """The chat template `tokenizer` (loaded from `folder`) carries is the one the manifest records, byte for byte: a
    template is code that decides every prompt, and one changed since training would answer (and be exported, merged
    or to GGUF) in a format the adapter never learned."""
    recorded = (manifest.data or {}).get("chat_template")
    if not isinstance(recorded, dict):  # trained on instructions: its prompts are lora_ft's Alpaca format
        return
    template = tokenizer.chat_template
    found = hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) else None
    if found != recorded.get("sha256"):
        where = Path(folder) / ("chat_template.jinja" if (Path(folder) / "chat_template.jinja").is_file() else "")
        shown = f"sha256 {found[:12]}…" if found else "none"
        raise UserError(
            f"{where}: the chat template is not the one it was trained with ({shown}, the manifest records "
            f"sha256 {str(recorded.get('sha256'))[:12]}…): restore it"
        )


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def base_name(base: dict[str, Any]) -> str:
    """A short name for a manifest's base: the Hub id or alias, or the folder's name."""
    if not isinstance(base, dict):
        raise TypeError(f"'base' is {type(base).__name__}, not an object")
    if base.get("kind") == "local":
        return Path(_text(base.get("location"), "base location")).name
    return _text(base.get("spec"), "base spec")


def _text(value: Any, what: str, optional: bool = False) -> str | None:
    """A string the listing shows, from a manifest or run record; another type is a TypeError, which lists the file as
    unexpected content (the table and its sort by `created` need strings)."""
    if not isinstance(value, str) and not (optional and value is None):
        raise TypeError(f"{what} is {'null' if value is None else type(value).__name__}, not a string")
    return value


def describe_folder(folder: Path) -> Listed:
    """The listing row of an adapter or merged-export folder (for an export: when and onto what it was merged)."""
    listed = Listed(str(folder), "adapter" if (folder / "adapter_config.json").is_file() else "?")
    listed.size_bytes = folder_size(folder)
    try:
        manifest = read_manifest(folder, adapter=False)
        merge = manifest.merge
        if merge and listed.kind == "?":
            listed.kind = "merged"
        elif is_whole_model(manifest) and (folder / "config.json").is_file():
            listed.kind = "full model"
        listed.method = _text(manifest.config.get("method", "lora"), "method")
        task = manifest.task
        listed.task, listed.metric = task, registry.TASKS[task].key_metric if task in registry.TASKS else None
        listed.created = _text(merge.get("created") if merge else manifest.created, "created", optional=True)
        listed.base = base_name(merge["base"] if merge else manifest.base)
        listed.value = manifest.test_metric(listed.metric)
        listed.interval = manifest.test_interval(listed.metric)
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError, AttributeError) as e:
        listed.problem = f"{folder / MANIFEST_NAME}: unexpected content ({type(e).__name__}: {e})"
    return listed


def list_adapters(root: str | Path = ADAPTERS_DIR) -> list[Listed]:
    """Every adapter or merged-export folder under `root` (any depth), oldest first. Hidden folders (temp
    folders of writes in progress) are skipped; a folder whose manifest cannot be read is listed with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    folders = {p.parent for name in (MANIFEST_NAME, "adapter_config.json") for p in root.rglob(name)}
    visible = [f for f in folders if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    found = [describe_folder(f) for f in visible] + [
        _describe_run(p.parent) for p in root.rglob(f"*{PARTIAL}/{RUN_RECORD}")
    ]
    return sorted(found, key=lambda listed: (listed.created or "", listed.path))


def _describe_run(folder: Path) -> Listed:
    """The listing row of a training run, live ("running") or not ("interrupted"), under the output path it is
    building."""
    listed = Listed(str(output_of(folder)), "interrupted", size_bytes=folder_size(folder))
    owner, checkpoint = running(folder), newest_checkpoint(folder)
    if owner is not None:
        listed.kind, listed.state = "running", owner
    elif checkpoint is not None:
        listed.state = f"step {checkpoint.name.removeprefix('checkpoint-')}"
    try:
        record = read_run_record(folder)
        listed.task, listed.base = _text(record.get("task"), "task"), base_name(record.get("base"))
        listed.created = _text(record.get("started"), "started", optional=True)
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError, AttributeError) as e:
        listed.problem = f"{folder / RUN_RECORD}: unexpected content ({type(e).__name__}: {e})"
    return listed
