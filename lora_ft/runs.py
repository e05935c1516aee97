"""A training run in progress: built in `.NAME.partial` beside its output, with Trainer's checkpoints under
`checkpoints/` and `run.json` (what the run was started with), so that `--resume` can continue it; renamed into
place when complete."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunKept, UserError
from .files import (
    MAX_RECORD_BYTES,
    check_output_free,
    check_size,
    now_iso,
    parse_json,
    replace_folder,
    sha256_file,
    write_json_atomically,
)

if TYPE_CHECKING:
    from accelerate import PartialState

ADAPTERS_DIR = Path("adapters")


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


def check_run_free(output: Path, overwrite: bool, resuming: bool, keep: dict[str, Path] | None = None) -> None:
    """Refuse an output that may not be written (see `files.check_output_free`; `keep`: what the run reads), and a
    new run over an interrupted one's checkpoints."""
    check_output_free(output, overwrite, keep)
    if not resuming and partial_folder(output).exists():
        raise UserError(
            f"{output}: an interrupted run into it is kept in {partial_folder(output)}; continue it with "
            f"`resume` {output}, or delete that folder to start again"
        )


def read_by(record: dict[str, Any]) -> dict[str, Path]:
    """What a run reads, which its output may not touch: its base's folder (unless it came from the Hub) and its
    data file."""
    kept = {"the data": Path(record["data"]["path"])}
    if record["base"].get("kind") != "hub":
        kept["the base model"] = Path(record["base"]["location"])
    return kept


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
    error or interrupt it is kept if it holds a checkpoint, so the run can be resumed, and `RunKept` (naming it) is
    raised from the error; else it is removed and the error goes on as it was. `output`, if it existed, is left as
    it was either way. In a run of several `processes` only the main one makes, renames or removes it."""
    main = processes is None or processes.is_main_process
    tmp = partial_folder(output)
    _wait_for_everyone(processes)  # no process may see another's new folder as an earlier run's
    check_run_free(output, overwrite, resuming=resume is not None, keep=read_by(record))
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
        check_output_free(output, overwrite, read_by(record))  # still: it may have appeared while this run trained
        _wait_for_everyone(processes)  # every process has checked before the main one renames
        if main:
            shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
            (tmp / RUN_RECORD).unlink(missing_ok=True)
            replace_folder(output, tmp)
        _wait_for_everyone(processes)  # so that every process returns with `output` in place
    except BaseException as e:
        if _has_checkpoint(tmp):
            raise RunKept(tmp, e) from e
        if main:
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
            raise UserError(f"`resume` latest: no interrupted {task} run under {root}")
        path = max(runs, key=lambda f: (f / RUN_RECORD).stat().st_mtime)
    elif path.name.startswith("checkpoint-") and path.parent.name == CHECKPOINTS:
        checkpoint, path = path, path.parent.parent
    elif not path.name.endswith(PARTIAL):
        path = partial_folder(path)
    if not (path / RUN_RECORD).is_file():
        raise UserError(f"`resume` {spec}: no interrupted run there ({path / RUN_RECORD} not found)")
    record = read_run_record(path)
    if record.get("task") != task:
        raise UserError(f"`resume` {spec}: a '{record.get('task')}' run, not a {task} one")
    found = checkpoint or get_last_checkpoint(str(path / CHECKPOINTS))
    if found is None or not Path(found, "trainer_state.json").is_file():
        raise UserError(f"`resume` {spec}: {path / CHECKPOINTS} holds no complete checkpoint")
    return Run(path, record, Path(found))


def run_record(task: str, config: Any, data_path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """run.json: what a run is started with, and what its resumption must match."""
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
        raise UserError(f"`resume` {checkpoint}: not a checkpoint of the run into {record['output']} ({run_folder})")
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
        check_size(path, MAX_RECORD_BYTES, "run record")
        record = parse_json(path.read_text(encoding="utf-8"))
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
