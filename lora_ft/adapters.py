"""The adapter folder: written atomically (temp dir, then rename), with its manifest and plots; read back."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

MANIFEST = "lora_ft.json"
ADAPTERS_DIR = Path("adapters")
_PACKAGES = ("lora_ft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def default_output(task: str, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return ADAPTERS_DIR / f"{task}-{model_name}-{stamp}"


def check_output_free(output: Path, overwrite: bool = False) -> None:
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: already exists; choose another --output or pass --overwrite")


@contextlib.contextmanager
def staged(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `output`; on success it replaces `output` in one rename, on any error it is
    removed and `output` (if it existed) is left as it was."""
    check_output_free(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{int(time.time())}"
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(model: Any, tokenizer: Any, folder: Path) -> None:
    """PEFT's adapter files and the tokenizer; the base is not written."""
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; lora_ft.json says more
    tokenizer.save_pretrained(folder)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise UserError(f"{folder}: not a lora_ft adapter folder (no {MANIFEST})")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: adapter_config.json is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_with_base(adapter: str | Path, task: str, load_base: Callable[..., Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, manifest): the base the manifest names, built by `load_base(source, tokenizer,
    manifest)`, with the adapter applied, in eval mode."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .models import source_from_manifest

    manifest = read_manifest(adapter)
    if manifest.get("task") != task:
        raise UserError(f"{adapter}: a '{manifest.get('task')}' adapter, not a {task} one")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = load_base(source_from_manifest(manifest["base"]), tokenizer, manifest)
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer, manifest


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """Train loss per logging step and val loss per evaluation, against epochs."""
    plt = _pyplot()
    train = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e and "epoch" in e]
    val = [(e["epoch"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train", "-"), (val, "val", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="train and val loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
