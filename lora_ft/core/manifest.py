"""The manifest, `lora_ft.json`: what made an adapter (or a merged export). It is written and read here, and nowhere
else; other modules read its fields (and the typed views below), not its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import METHODS, RunConfig
from .errors import UserError
from .files import MANIFEST_NAME, MAX_RECORD_BYTES, parse_json, read_bytes, sha256_file


class Section:
    """A manifest key read as an attribute: `manifest.metrics` is `manifest["metrics"]` (None when absent)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, manifest: Manifest | None, owner: type | None = None) -> Any:
        return self if manifest is None else manifest.get(self.key)


class Manifest(dict):
    """One adapter's record: the JSON's sections (it is that JSON, as a dict: `json.dumps(manifest)` writes it), read
    as typed attributes, with the views other modules need."""

    task: str = Section()
    created: str = Section()
    config: dict[str, Any] = Section()  # the resolved RunConfig
    base: dict[str, Any] = Section()  # models.describe_base: where the base came from, what it is
    lora: dict[str, Any] = Section()  # targets, trainable parameters
    data: dict[str, Any] = Section()  # path, sha256, seed, fractions, split sizes, and what the task adds
    metrics: dict[str, Any] = Section()  # per split (and test_base for instruct)
    training: dict[str, Any] = Section()  # steps, seconds, tokens, precision as run, log history
    versions: dict[str, str] = Section()
    labels: dict[str, int] | None = Section()  # a classifier's label name -> id
    generation: dict[str, Any] | None = Section()  # instruct: how the test answers were generated
    merge: dict[str, Any] | None = Section()  # a merged export: onto what, how, and the check
    preference: dict[str, Any] | None = Section()  # prefer: the starting adapter, the reference, beta, the loss
    REQUIRED = ("task", "created", "config", "base", "lora", "data", "metrics", "training", "versions")
    TEXTS = ("task", "created")  # strings; the other sections are JSON objects
    OPTIONAL = ("labels", "generation", "merge", "preference")  # objects, or null or absent

    @property
    def run_config(self) -> RunConfig:
        """The config the adapter was trained with, reading the data file it recorded if that is still there."""
        config = RunConfig(**self.config)
        config.data = str(self.data_file) if self.data_file.is_file() else config.data
        return config

    @property
    def label_names(self) -> list[str]:
        """A classifier's label names in id order."""
        return sorted(self.labels or {}, key=(self.labels or {}).get)

    @property
    def data_file(self) -> Path:
        return Path(self.data["path"])

    @property
    def fractions(self) -> tuple[float, ...]:
        """The train/val/test fractions the data was split by."""
        return tuple(self.data["fractions"])

    def data_unchanged(self) -> bool:
        """The data file the adapter was trained on is still there, byte for byte."""
        return self.data_file.is_file() and sha256_file(self.data_file) == self.data["sha256"]

    @property
    def as_trained(self) -> tuple[str | None, str]:
        """(quantize, precision) the adapter was trained with, to load its base the same way; (None, "fp32") for
        adapters from before QLoRA."""
        return self.config.get("quantize"), self.training.get("precision", "fp32")

    def test_metric(self, name: str | None) -> float | None:
        value = self.metrics.get("test", {}).get(name) if name else None
        return value if isinstance(value, (int, float)) else None

    def test_interval(self, name: str | None) -> list[float] | None:
        """The 95% interval recorded with a test metric (`<name>_ci95`: [low, high]), None for none."""
        value = self.metrics.get("test", {}).get(f"{name}_ci95") if name else None
        valid = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        return value if valid else None

    def with_merge(self, section: dict[str, Any]) -> Manifest:
        """This manifest with a `merge` section: a merged export's."""
        return Manifest({**self, "merge": section})

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(self, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The folder's manifest; a missing, unreadable or incomplete one is a UserError naming the file."""
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: adapter folder not found")
        if not path.is_file():
            raise UserError(f"{folder}: not a lora_ft adapter folder (no {MANIFEST_NAME})")
        try:
            value = parse_json(read_bytes(path, MAX_RECORD_BYTES, "manifest").decode("utf-8"))
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}: a manifest is a JSON object, got {type(value).__name__}")
        missing = [key for key in cls.REQUIRED if value.get(key) is None]
        if missing:
            raise UserError(f"{path}: not a complete manifest (no '{missing[0]}')")
        cls._check_types(path, value)
        method = value["config"].get("method", "lora")
        if method not in METHODS:  # what loads the adapter depends on it (methods.of)
            raise UserError(f"{path}: unknown 'config.method' {method!r} (known: {', '.join(METHODS)})")
        return cls(value)

    @classmethod
    def _check_types(cls, path: Path, value: dict[str, Any]) -> None:
        """Each section has the JSON type its typed attribute promises, so that readers of `manifest.task` or
        `manifest.metrics.get(...)` need not check (what is inside a section is its readers' business)."""
        for key in (*cls.REQUIRED, *cls.OPTIONAL):
            want = str if key in cls.TEXTS else dict
            if value.get(key) is not None and not isinstance(value[key], want):  # missing or null: refused above
                got = type(value[key]).__name__
                raise UserError(f"{path}: '{key}' must be {'a string' if want is str else 'an object'}, got {got}")
