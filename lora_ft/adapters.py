"""The adapter folder: written atomically (temp dir, then rename), with its manifest and plots; read back with
its base; listed."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from accelerate import PartialState

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
        _replace(output, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A training run is built in `.NAME.partial` beside its output: Trainer's checkpoints under `checkpoints/`, and
# `run.json`, what the run was started with, so that `--resume` can continue it.
PARTIAL = ".partial"
RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"


def partial_folder(output: Path) -> Path:
    return output.parent.resolve() / f".{output.name}{PARTIAL}"


def output_of(partial: Path) -> Path:
    """The output folder a `.partial` run folder is being built for."""
    return partial.parent / partial.name[1 : -len(PARTIAL)]


def check_run_free(output: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse an output that exists (unless `overwrite`), and a new run over an interrupted one's checkpoints."""
    check_output_free(output, overwrite)
    if not resuming and partial_folder(output).exists():
        raise UserError(
            f"{output}: an interrupted run into it is kept in {partial_folder(output)}; continue it with "
            f"--resume {output}, or delete that folder to start again"
        )


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / CHECKPOINTS).glob("checkpoint-*"))


@contextlib.contextmanager
def training_folder(
    output: Path,
    overwrite: bool,
    record: dict[str, Any],
    resume: Path | None = None,
    processes: PartialState | None = None,
) -> Iterator[Path]:
    """Yield the run's `.partial` folder: made, with `record` as run.json, or, to `resume` from one of its
    checkpoints, checked to be the same run (`check_resume`). On success it replaces `output` in one rename. On an
    error or interrupt it is kept if it holds a checkpoint, so the run can be resumed; the exception then carries
    `resume_folder`. Else it is removed. `output`, if it existed, is left as it was either way. In a run of several
    `processes` only the main one makes, renames or removes it."""
    main = processes is None or processes.is_main_process
    tmp = partial_folder(output)
    _wait_for_everyone(processes)  # no process may see another's new folder as an earlier run's
    check_run_free(output, overwrite, resuming=resume is not None)
    if resume is not None:
        check_resume(resume, record)
    _wait_for_everyone(processes)
    if main and resume is None:
        tmp.mkdir(parents=True)
        write_json_atomically(tmp / RUN_RECORD, record)
    _wait_for_everyone(processes)
    try:
        yield tmp
        _wait_for_everyone(processes)
        check_output_free(output, overwrite)  # still: it may have appeared while this run trained
        _wait_for_everyone(processes)  # every process has checked before the main one renames
        if main:
            shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
            (tmp / RUN_RECORD).unlink(missing_ok=True)
            _replace(output, tmp)
        _wait_for_everyone(processes)  # so that every process returns with `output` in place
    except BaseException as e:
        if _has_checkpoint(tmp):
            e.resume_folder = tmp  # type: ignore[attr-defined]
        elif main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Run:
    """An interrupted (or crashed) training run that `--resume` can continue."""

    folder: Path  # its .partial folder
    record: dict[str, Any]  # run.json: task, output, config, data, base
    checkpoint: Path  # the checkpoint to continue from


def find_run(spec: str | Path, task: str, root: Path = ADAPTERS_DIR) -> Run:
    """The run `--resume` names: `latest` (the newest one of `task` under `root`), the output folder it was
    writing, its `.partial` folder, or one of its checkpoints (default: its last)."""
    from transformers.trainer_utils import get_last_checkpoint

    path, checkpoint = Path(spec), None
    if str(spec) == "latest":
        runs = [f for f in root.glob(f".*{PARTIAL}") if _task_of(f) == task] if root.is_dir() else []
        if not runs:
            raise UserError(f"--resume latest: no interrupted {task} run under {root}")
        path = max(runs, key=lambda f: (f / RUN_RECORD).stat().st_mtime)
    elif path.name.startswith("checkpoint-") and path.parent.name == CHECKPOINTS:
        checkpoint, path = path, path.parent.parent
    elif not path.name.endswith(PARTIAL):
        path = partial_folder(path)
    if not (path / RUN_RECORD).is_file():
        raise UserError(f"--resume {spec}: no interrupted run there ({path / RUN_RECORD} not found)")
    record = read_run_record(path)
    if record.get("task") != task:
        raise UserError(f"--resume {spec}: a '{record.get('task')}' run, not a {task} one")
    found = checkpoint or get_last_checkpoint(str(path / CHECKPOINTS))
    if found is None or not Path(found, "trainer_state.json").is_file():
        raise UserError(f"--resume {spec}: {path / CHECKPOINTS} holds no complete checkpoint")
    return Run(path, record, Path(found))


def run_record(task: str, config: Any, data_path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """run.json: what a run is started with, and what its resumption must match."""
    from .data import sha256_file

    data = {"path": str(data_path), "sha256": sha256_file(data_path)}
    return {
        "task": task,
        "started": now_iso(),
        "output": config.output,
        "config": config.to_dict(),
        "data": data,
        "base": base,
    }


def check_resume(checkpoint: Path, record: dict[str, Any]) -> None:
    """A run resumed from `checkpoint` must be the interrupted one: the same output, config, data and base (see
    `run_record`)."""
    from .models import base_mismatches

    run_folder = partial_folder(Path(record["output"]))
    if Path(checkpoint).resolve().parent.parent != run_folder or not (run_folder / RUN_RECORD).is_file():
        raise UserError(f"--resume {checkpoint}: not a checkpoint of the run into {record['output']} ({run_folder})")
    recorded = read_run_record(run_folder)
    now = json.loads(json.dumps(record))
    differ = [
        f"{key} {now['config'][key]!r} (was {value!r})"
        for key, value in recorded["config"].items()
        if now["config"].get(key) != value
    ]
    if recorded["data"]["sha256"] != now["data"]["sha256"]:
        differ.append(f"data {now['data']['path']} (its sha256 differs from the interrupted run's)")
    differ += base_mismatches(recorded["base"], now["base"])
    if differ:
        raise UserError(f"{run_folder}: cannot resume, this run differs from the interrupted one: {'; '.join(differ)}")


def read_run_record(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UserError(f"{path}: not a run record (a JSON object with a 'config')")
    return record


def _task_of(folder: Path) -> str | None:
    try:
        return read_run_record(folder).get("task")
    except UserError:
        return None


def _wait_for_everyone(processes: PartialState | None) -> None:
    if processes is not None:
        processes.wait_for_everyone()


def _replace(output: Path, tmp: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)


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


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as JSON at `path`, written beside it first and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(folder: str | Path, adapter: bool = True) -> dict[str, Any]:
    """The folder's manifest. With `adapter`, the folder must also hold PEFT's adapter (not a merged export)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise UserError(f"{folder}: not a lora_ft adapter folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    if adapter and not (folder / "adapter_config.json").is_file():
        if "merge" in manifest:
            raise UserError(f"{folder}: a merged export, not an adapter (load it with transformers directly)")
        raise UserError(f"{folder}: adapter_config.json is missing")
    return manifest


def _quantization_as_trained(manifest: dict[str, Any]) -> tuple[str | None, str]:
    """(quantize, precision) the adapter was trained with, to load its base the same way; (None, "fp32") for
    adapters from before QLoRA."""
    return manifest["config"].get("quantize"), manifest.get("training", {}).get("precision", "fp32")


@dataclass
class Loaded:
    """An adapter on its base, in eval mode; `base` describes the base actually loaded, and `base_mismatches`
    how it differs from the one the adapter was trained on (empty unless `force` accepted a different base)."""

    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    base: dict[str, Any]
    base_mismatches: list[str]


def load_with_base(
    adapter: str | Path,
    task: str,
    load_base: Callable[..., Any],
    source: Any = None,
    force: bool = False,
    full_precision: bool = False,
) -> Loaded:
    """The adapter on a base built by `load_base(source, tokenizer, manifest, quantize, precision)`: the base the
    manifest names, or `source`, quantised as in training (QLoRA), or in float32 with `full_precision`. A base that
    is not the one the adapter was trained on (architecture, size, weights) is refused unless `force`."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from .models import base_mismatches, describe_base, source_from_manifest

    manifest = read_manifest(adapter)
    if manifest.get("task") != task:
        raise UserError(f"{adapter}: a '{manifest.get('task')}' adapter, not a {task} one")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    source = source or source_from_manifest(manifest["base"])
    quantize, precision = (None, "fp32") if full_precision else _quantization_as_trained(manifest)
    base = load_base(source, tokenizer, manifest, quantize, precision)
    info = describe_base(source, base)
    mismatches = base_mismatches(manifest["base"], info)
    if mismatches and not force:
        raise UserError(
            f"{adapter}: {source.spec} is not the base it was trained on ({'; '.join(mismatches)}); "
            "pass --force to use it anyway"
        )
    try:
        model = PeftModel.from_pretrained(base, adapter).eval()
    except SafetensorError as e:
        weights = Path(adapter) / "adapter_model.safetensors"
        raise UserError(f"{weights}: corrupt or incomplete ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # json.JSONDecodeError included
        raise UserError(f"{Path(adapter) / 'adapter_config.json'}: unreadable ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:  # tensor shapes that do not fit, once --force let a different base through
        lines = [line.strip() for line in str(e).splitlines()]
        why = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise UserError(f"{adapter}: its weights do not fit {source.spec} ({why})") from None
    return Loaded(model, tokenizer, manifest, info, mismatches)


# The test metric `adapters` shows for each task.
KEY_METRICS = {"spam": "accuracy", "instruct": "rouge_l"}


@dataclass
class Listed:
    """One row of `adapters`: an adapter or merged export folder, described by its manifest."""

    path: str
    kind: str  # "adapter" | "merged" | "?" (manifest unreadable)
    task: str | None = None
    base: str | None = None
    created: str | None = None
    metric: str | None = None
    value: float | None = None
    size_bytes: int = 0
    problem: str | None = None


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def base_name(base: dict[str, Any]) -> str:
    """A short name for a manifest's base: the Hub id or alias, or the folder's name."""
    return base["spec"] if base.get("kind") != "local" else Path(base["location"]).name


def describe_folder(folder: Path) -> Listed:
    """The listing row of an adapter or merged-export folder (for an export: when and onto what it was merged)."""
    listed = Listed(str(folder), "adapter" if (folder / "adapter_config.json").is_file() else "?")
    listed.size_bytes = folder_size(folder)
    try:
        manifest = read_manifest(folder, adapter=False)
        merge = manifest.get("merge")
        if merge and listed.kind == "?":
            listed.kind = "merged"
        task = manifest["task"]
        listed.task, listed.metric = task, KEY_METRICS.get(task)
        listed.created = (merge or manifest).get("created")
        listed.base = base_name((merge or manifest)["base"])
        listed.value = manifest.get("metrics", {}).get("test", {}).get(listed.metric)
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError, AttributeError) as e:
        listed.problem = f"{folder / MANIFEST}: unexpected content ({type(e).__name__}: {e})"
    return listed


def list_adapters(root: str | Path = ADAPTERS_DIR) -> list[Listed]:
    """Every adapter or merged-export folder under `root` (any depth), oldest first. Hidden folders (temp
    folders of writes in progress) are skipped; a folder whose manifest cannot be read is listed with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    folders = {p.parent for name in (MANIFEST, "adapter_config.json") for p in root.rglob(name)}
    visible = [f for f in folders if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    found = [describe_folder(f) for f in visible] + [
        _describe_run(p.parent) for p in root.rglob(f"*{PARTIAL}/{RUN_RECORD}")
    ]
    return sorted(found, key=lambda listed: (listed.created or "", listed.path))


def _describe_run(folder: Path) -> Listed:
    """The listing row of an interrupted run (kind "interrupted"), under the output path it is building."""
    listed = Listed(str(output_of(folder)), "interrupted", size_bytes=folder_size(folder))
    try:
        record = read_run_record(folder)
        listed.task, listed.created, listed.base = record["task"], record.get("started"), base_name(record["base"])
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError) as e:
        listed.problem = f"{folder / RUN_RECORD}: unexpected content ({type(e).__name__}: {e})"
    return listed


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
