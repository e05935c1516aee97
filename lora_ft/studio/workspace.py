"""`studio`'s workspace: the folder its runs, uploads and state live in, and what it reads there. Paths given to it
are confined to it (no `..`; symlinks resolved, then checked); the form's fields are RunConfig's settings (`schema`);
a run's settings pass the recipe checks and the task's own data reader before it is queued (`check`); an uploaded
data file is capped, saved under studio/uploads/ and read the same way; the adapters in it are listed as `adapters`
lists them, opened as `inspect` shows them, and compared as `compare` compares them."""

from __future__ import annotations

import base64
import os
import re
import tempfile
import typing
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..bench import compare
from ..core import files, plots, registry, report
from ..core.config import RunConfig, parse_recipe, settings, task_defaults, validate
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..engine import adapters, methods
from ..tasks import task_code

STATE = "studio"  # <workspace>/studio/: runs/<id>/ (state.json, recipe.yaml, log.txt) and uploads/
UPLOADS = "uploads"
ADAPTERS = "adapters"  # <workspace>/adapters/<run id>: each run's adapter folder
MAX_UPLOAD_BYTES = 64 << 20
STUDIO_NAMES = ("output",)  # settings the studio sets itself: each run's folder is adapters/<run id>


class SettingError(UserError):
    """Bad input that one setting of the form holds (`field`): the page shows it beside that field."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.field = field or field_of(message)


class Workspace:
    def __init__(self, folder: str | Path, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise UserError(f"`workspace` {folder}: folder not found")
        if max_upload_bytes < 1:
            raise UserError(f"`max_upload_mb` must be > 0, got {max_upload_bytes / (1 << 20):g}")
        self.max_upload_bytes = max_upload_bytes

    def inside(self, value: str, what: str) -> Path:
        """`value` (relative to the workspace, or absolute) resolved, when it is inside the workspace."""
        path = Path(value).expanduser()
        resolved = (self.root / path).resolve()
        if ".." in path.parts or not resolved.is_relative_to(self.root):
            raise UserError(f"`{what}` {value}: outside the workspace ({self.root})")
        return resolved

    def shown(self, path: str | Path) -> str:
        """A path as the page shows it: relative to the workspace when inside it."""
        path = Path(path)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    # --- the form --------------------------------------------------------------------------------------------

    def check(self, task: Any, values: Any) -> dict[str, Any]:
        """A run's settings (recipe keys), checked as a recipe is, with its paths inside the workspace and its data
        file read by the task's own reader, so that a bad row is refused now with the error training would give."""
        registry.get(task)
        if not isinstance(values, dict):
            raise UserError(f"`settings` must be an object of recipe keys, got {type(values).__name__}")
        try:
            values = validate({k: v for k, v in values.items() if k != "task"}, "settings", task)
            for name in STUDIO_NAMES:
                if name in values:
                    raise UserError(f"`{name}`: the studio names each run's folder ({ADAPTERS}/<run>); leave it out")
            model = values.get("model")
            if isinstance(model, str) and (model.startswith((".", "~", "/")) or self._exists(model)):
                self.inside(model, "model")
            config = RunConfig(**(task_defaults(task) | values | {"model": model or "gpt2"}))
            methods.check(config)  # a combination PEFT cannot do, refused before it is queued
            if values.get("data") is not None:
                config.data = str(self.inside(values["data"], "data"))
        except UserError as e:
            raise SettingError(str(e), None) from None
        try:
            task_code.get(task).load_splits(config)
        except UserError as e:  # the reader names the file by its whole path; the page shows the workspace's
            raise SettingError(str(e).replace(f"{self.root}{os.sep}", ""), "data") from None
        return values

    def _exists(self, name: str) -> bool:
        return (self.root / name).exists() or (self.root / name).is_symlink()

    def recipe(self, task: str, values: dict[str, Any]) -> str:
        return yaml.safe_dump({"task": task, **values}, sort_keys=False, allow_unicode=True)

    def read_recipe(self, text: str) -> dict[str, Any]:
        """A recipe loaded into the form: its task and settings, checked as a recipe file is."""
        values = parse_recipe(text, "recipe")
        task = values.pop("task", None)
        registry.get(task, "recipe: task")
        return {"task": task, "settings": validate(values, "recipe", task)}

    def upload(self, name: str, data: bytes, task: str, values: dict[str, Any] | None = None) -> str:
        """Save an uploaded data file under studio/uploads/ and read it with the task's reader; a file it refuses is
        removed again (the studio made it) and the reader's error raised. Returns its path in the workspace."""
        if len(data) > self.max_upload_bytes:
            raise UserError(f"{name}: {len(data):,} bytes, over the {self.max_upload_bytes:,} an upload may be")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".") or "data"
        target = self.root / STATE / UPLOADS / f"{datetime.now():%Y%m%d-%H%M%S}-{safe}"
        files.write_bytes_atomically(target, data)
        try:
            self.check(task, {**(values or {}), "data": self.shown(target)})
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return self.shown(target)

    # --- the adapters ----------------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """Every adapter, export and training run in the workspace, as `adapters` lists them."""
        rows = []
        for listed in adapters.list_adapters(self.root):
            row = asdict(listed) | {"path": self.shown(listed.path), "name": Path(listed.path).name}
            rows.append(row)
        return rows

    def details(self, path: str) -> dict[str, Any]:
        """One adapter (or export) opened: its manifest as `inspect` shows it, its plots, its test metrics."""
        folder = self.inside(path, "path")
        manifest = adapters.read_manifest(folder, adapter=False)
        listed = adapters.describe_folder(folder)
        text = "\n".join(report.inspection(listed, manifest))
        pngs = [self.shown(p) for p in sorted(folder.glob("*.png"))]
        return {"path": self.shown(folder), "name": folder.name, "task": manifest.task, "kind": listed.kind} | {
            "inspection": text.replace(f"{self.root}{os.sep}", ""),
            "metrics": manifest.metrics,
            "pngs": pngs,
        }

    def png(self, path: str) -> Path:
        found = self.inside(path, "path")
        if found.suffix != ".png" or not found.is_file():
            raise UserError(f"`path` {path}: not a PNG file in the workspace")
        return found

    def compare(self, paths: list[str]) -> dict[str, Any]:
        """Several adapters of one task side by side: `compare`'s table and Pareto plot (as a data URL)."""
        if len(paths) < 2:
            raise UserError("select at least two adapters to compare")
        folders = [self.inside(p, "path") for p in paths]
        task_names = {Manifest.read(folder).task for folder in folders}
        if len(task_names) != 1:
            raise UserError(f"adapters of one task compare, got {', '.join(sorted(task_names))}")
        (task,) = task_names
        found = [compare.Run(self.shown(f), {}, compare.row(task, self.shown(f), f)) for f in folders]
        results = compare.summarise(task, found, Path(ADAPTERS))
        with tempfile.TemporaryDirectory() as tmp:
            plots.plot_pareto(results, Path(tmp) / "pareto.png")
            png = base64.b64encode((Path(tmp) / "pareto.png").read_bytes()).decode()
        return {"results": results, "table": compare.table(results), "plot": f"data:image/png;base64,{png}"}

    def adapter_named(self, name: str) -> Path | None:
        """The adapter folder adapters/<name> (a run's, named by the run), if it holds a finished one."""
        if "/" in name or name.startswith(".") or os.sep in name:
            return None
        folder = self.root / ADAPTERS / name
        return folder if (folder / files.MANIFEST_NAME).is_file() else None


def schema(task: str) -> dict[str, Any]:
    """The form for `task`: each setting it reads with its type, the task's default, help, choices and what its
    check asks, from RunConfig's declarations (a new setting needs no page code)."""
    defaults, hints = task_defaults(registry.get(task).name), typing.get_type_hints(RunConfig)
    fields = []
    for field in settings(task):
        if field.name in STUDIO_NAMES:
            continue
        meta, args = field.metadata, typing.get_args(hints[field.name])
        kind = next((h for h in args if h is not type(None)), hints[field.name])
        check = meta["check"][1] if meta["check"] and not meta["choices"] else None
        fields.append(
            {
                "name": field.name,
                "type": "list" if typing.get_origin(kind) is list else kind.__name__,
                "nullable": type(None) in args,
                "default": defaults[field.name],
                "help": meta["help"],
                "choices": list(meta["choices"]) if meta["choices"] else None,
                "check": check,
                "task_only": meta["task"] is not None,
            }
        )
    return {"task": task, "tasks": list(registry.NAMES), "settings": fields}


def field_of(message: str) -> str | None:
    """The setting an error names ('key' or `key`), so that the page shows it beside that field."""
    names = {f.name for f in settings()}
    return next((m for m in re.findall(r"['`]([a-z][a-z0-9_]*)['`]", message) if m in names), None)
