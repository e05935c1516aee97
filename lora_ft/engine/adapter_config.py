"""`adapter_config.json`, the file PEFT builds an adapter's layers from, checked against the manifest before PEFT reads
it: a hand edit would otherwise load another adapter than the one trained (other layers, another scale) or fail deep
inside PEFT with its own exception. Training records the file's sha256 in the manifest (`record`); loading checks
the file (`check`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any

from ..core import registry
from ..core.errors import UserError
from ..core.files import MANIFEST_NAME, MAX_RECORD_BYTES, parse_json, read_bytes, sha256_file
from ..core.manifest import Manifest
from . import methods

FILENAME = "adapter_config.json"
CONFIG_SHA256 = "adapter_config_sha256"  # in the manifest's `lora` section: the file as training wrote it


def record(folder: Path, manifest: Manifest) -> None:
    """Record in the manifest the sha256 of the adapter_config.json just saved (none for a whole model)."""
    if (folder / FILENAME).is_file():
        manifest.lora[CONFIG_SHA256] = sha256_file(folder / FILENAME)


def check(folder: str | Path, manifest: Manifest) -> None:
    """`adapter_config.json` is the adapter the manifest describes. PEFT builds the layers from that file, so a hand
    edit would load another adapter than the one trained (other layers, another scale), or fail deep inside PEFT.
    Every field PEFT declares must have its declared type and every field the manifest records must agree, each
    refused by name; then the whole file must be the one training wrote (its sha256), where the manifest has it."""
    path = Path(folder) / FILENAME
    raw = _read(path)
    found = _json_object(path, raw)
    config_class = _peft_config_class(path, found.get("peft_type"))
    for field, value in found.items():
        expected = _annotations(config_class).get(field)  # None: a field PEFT does not declare
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
    if recorded_sha is not None and hashlib.sha256(raw).hexdigest() != recorded_sha:  # the bytes just checked
        why = f"its sha256 is not the one {MANIFEST_NAME} records"
        raise UserError(f"{path}: changed since training ({why}): restore it")


def _read(path: Path) -> bytes:
    try:
        return read_bytes(path, MAX_RECORD_BYTES, "adapter config")
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None


def _json_object(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        found = parse_json(raw.decode("utf-8"))  # deep nesting and huge integers as JSONDecodeError too
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: a JSON {type(found).__name__}, not an object")
    return found


def _peft_config_class(path: Path, peft_type: Any) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UserError(f'{path}: "peft_type" is {_brief(peft_type)}, not one of PEFT\'s (LORA, IA3, VERA, ...)')
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


@functools.cache
def _annotations(config_class: type) -> dict[str, Any]:
    """The fields' annotations in PEFT's config dataclass."""
    return typing.get_type_hints(config_class)


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
