"""A training run in progress: built in `.NAME.partial` beside its output, with Trainer's checkpoints under
`checkpoints/` and `run.json` (what the run was started with), so that `--resume` can continue it; renamed into
place when complete."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import RunKept, UserError
from ..core.files import (
    MAX_RECORD_BYTES,
    check_output_free,
    now_iso,
    parse_json,
    read_bytes,
    replace_folder,
    sha256_file,
    without_room,
    write_json_atomically,
)

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

PartialState = Any  # accelerate's, not imported here (a run's folder is handled before torch is needed)

log = logging.getLogger("lora_ft")

ADAPTERS_DIR = Path("adapters")


# A training run is built in `.NAME.partial` beside its output: Trainer's checkpoints under `checkpoints/`, and
# `run.json`, what the run was started with, so that `--resume` can continue it.
PARTIAL = ".partial"


RUN_RECORD = "run.json"


CHECKPOINTS = "checkpoints"


# The run's progress as JSON lines (callbacks.ProgressLog), kept in the adapter folder when the run completes.
PROGRESS_LOG = "progress.jsonl"


# Held (flock) by the process building a `.partial` folder, with its PID inside. The kernel lets go when the process
# dies, however it dies: a folder whose lock can be taken is a stopped run, one whose lock cannot is a live one.
LOCK = "run.lock"


# A run's settings that name files: compared as resolved paths (the data by its sha256, the output by its folder).
PATHS = ("output", "data", "model")


def partial_folder(output: Path) -> Path:
    return output.parent.resolve() / f".{output.name}{PARTIAL}"


def output_of(partial: Path) -> Path:
    """The output folder a `.partial` run folder is being built for."""
    return partial.parent / partial.name[1 : -len(PARTIAL)]


def check_run_free(output: Path, overwrite: bool, resuming: bool, keep: dict[str, Path] | None = None) -> None:
    """Refuse an output that may not be written (see `files.check_output_free`; `keep`: what the run reads), one
    that a live run is building, and a new run over an interrupted one's checkpoints. An interrupted run with no
    complete checkpoint is no obstacle: there is nothing to resume, and `training_folder` starts it again."""
    check_output_free(output, overwrite, keep)
    folder = partial_folder(output)
    if not folder.exists():
        return
    check_not_running(folder)
    if not resuming and newest_checkpoint(folder) is not None:
        raise UserError(
            f"{output}: an interrupted run into it is kept in {folder}; continue it with "
            f"`resume` {output}, or delete that folder to start again"
        )


def check_not_running(folder: Path) -> None:
    """Refuse a run folder that a live process is building (it holds the folder's lock)."""
    owner = running(folder)
    if owner is not None:
        raise UserError(
            f"{output_of(folder)}: a run into it is in progress ({owner}, building {folder}); wait for it to end, "
            f"or stop it (it keeps a checkpoint to resume)"
        )


def running(folder: Path) -> str | None:
    """ "PID N" of the live process that holds `folder`'s lock, or None when no process does."""
    lock = _lock(folder, probe=True)
    if lock is not None:
        os.close(lock)
        return None
    try:
        return f"PID {(folder / LOCK).read_text().strip() or '?'}"
    except OSError:
        return "another process"


def _lock(folder: Path, probe: bool = False) -> int | None:
    """Take `folder`'s lock, writing this PID into it: a file descriptor to keep open while the run is live, or None
    if another process holds it (or the folder is gone). To `probe` is to take it without writing, or creating
    its file: a folder without one is no live run's."""
    if fcntl is None:
        return os.open(os.devnull, os.O_RDONLY)
    try:  # not O_TRUNC: the holder's PID stays readable
        fd = os.open(folder / LOCK, os.O_RDWR if probe else os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return os.open(os.devnull, os.O_RDONLY) if probe and folder.is_dir() else None
    except NotADirectoryError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not probe:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def read_by(record: dict[str, Any]) -> dict[str, Path]:
    """What a run reads, which its output may not touch: its base's folder (unless it came from the Hub) and its
    data file."""
    kept = {"the data": Path(record["data"]["path"])}
    if record["base"].get("kind") != "hub":
        kept["the base model"] = Path(record["base"]["location"])
    return kept


def newest_checkpoint(folder: Path) -> Path | None:
    """The run's newest complete checkpoint: one whose trainer_state.json, which Trainer writes last, is there and
    reads. A checkpoint cut short by a crash or kill -9 is passed over for the one before it."""
    found = sorted(
        (c for c in (folder / CHECKPOINTS).glob("checkpoint-*") if c.name.removeprefix("checkpoint-").isdigit()),
        key=lambda c: int(c.name.removeprefix("checkpoint-")),
        reverse=True,
    )
    return next((c for c in found if complete(c)), None)


def _remove_incomplete(folder: Path) -> None:
    """Checkpoints a crash cut short: Trainer would otherwise count them among those it keeps, and drop a good one."""
    for checkpoint in (folder / CHECKPOINTS).glob("checkpoint-*"):
        if not complete(checkpoint):
            log.warning("%s: incomplete (the run stopped while saving it); removed", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)


def complete(checkpoint: Path) -> bool:
    try:
        state = parse_json((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


@contextlib.contextmanager
def training_folder(
    output: Path,
    overwrite: bool,
    record: dict[str, Any],
    resume: Path | None = None,
    processes: PartialState | None = None,
) -> Iterator[Path]:
    """Yield the run's `.partial` folder, locked by the main process while the run is live: made, with `record` as
    run.json (replacing an interrupted run's that holds no complete checkpoint), or, to `resume` from one of its
    checkpoints, checked to be the same run (`check_resume`). On success it replaces `output` in one rename. On an
    error or interrupt it is kept if it holds a complete checkpoint, so the run can be resumed, and `RunKept`
    (naming it) is raised from the error; else it is removed and the error goes on as it was. `output`, if it
    existed, is left as it was either way. In a run of several `processes` only the main one makes, locks, renames
    or removes it."""
    main = processes is None or processes.is_main_process
    tmp = partial_folder(output)
    _wait_for_everyone(processes)  # no process may see another's new folder as an earlier run's
    check_run_free(output, overwrite, resuming=resume is not None, keep=read_by(record))
    if resume is not None:
        check_resume(resume, record)
    _wait_for_everyone(processes)  # every process has checked before the main one locks
    lock = None
    if main:
        lock = _claim(tmp, record) if resume is None else _lock(tmp)
        if lock is None:
            check_not_running(tmp)
            raise UserError(f"{output}: another run into it started at the same time; try again")
        if resume is not None:
            _remove_incomplete(tmp)
    try:
        _wait_for_everyone(processes)
        yield tmp
        _wait_for_everyone(processes)
        check_output_free(output, overwrite, read_by(record))  # still: it may have appeared while this run trained
        _wait_for_everyone(processes)  # every process has checked before the main one renames
        if main:
            shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
            (tmp / RUN_RECORD).unlink(missing_ok=True)
            replace_folder(output, tmp)
            (output / LOCK).unlink(missing_ok=True)  # only now: until the rename, the lock says the run is live
        _wait_for_everyone(processes)  # so that every process returns with `output` in place
    except BaseException as e:
        error = without_room(output, e)  # a full disk: one line naming the output, not an internal error
        if newest_checkpoint(tmp) is not None:
            raise RunKept(tmp, error) from e
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is e:
            raise
        raise error from e
    finally:
        if lock is not None:
            os.close(lock)


def _claim(folder: Path, record: dict[str, Any]) -> int | None:
    """Make the run folder `folder`, locked, with `record` as run.json; or None if another live run has it. It is
    built under a temporary name and renamed into place, so that no process ever sees it unlocked or without its
    record. An interrupted run's folder there (one with no complete checkpoint: see `check_run_free`) is removed
    first, under its own lock, so that two runs cannot both remove it."""
    if folder.exists():
        stale = _lock(folder)
        if stale is None:
            return None
        log.warning("%s: an earlier run into it stopped before its first checkpoint; starting again", output_of(folder))
        shutil.rmtree(folder)
        os.close(stale)
    staged = folder.with_name(f"{folder.name}-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)  # a process with this PID died here before its rename
    try:
        staged.mkdir(parents=True)
        lock = _lock(staged)
        write_json_atomically(staged / RUN_RECORD, record)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise UserError(f"{output_of(folder)}: cannot write there ({e.strerror or e})") from None
    try:
        os.rename(staged, folder)  # fails if another run's folder appeared there meanwhile
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        return None
    return lock


@dataclass
class Run:
    """An interrupted (or crashed) training run that `--resume` can continue."""

    folder: Path  # its .partial folder
    record: dict[str, Any]  # run.json: task, output, config, data, base
    checkpoint: Path | None  # the checkpoint to continue from; None: it has none, start it again


def find_run(spec: str | Path, task: str, root: Path = ADAPTERS_DIR) -> Run:
    """The run `--resume` names: `latest` (the newest one of `task` under `root`), the output folder it was
    writing, its `.partial` folder, or one of its checkpoints (default: its newest complete one; none if it
    stopped before its first, and then the run starts again)."""
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
    if checkpoint is not None and not complete(checkpoint):
        raise UserError(f"`resume` {spec}: not a complete checkpoint (no readable trainer_state.json)")
    return Run(path, record, checkpoint or newest_checkpoint(path))


def run_record(task: str, config: Any, data_path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """run.json: what a run is started with, and what its resumption must match."""
    data = {"path": str(data_path), "sha256": sha256_file(data_path)}
    return {
        "task": task,
        "started": now_iso(),
        "output": str(Path(config.output).resolve()),
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
    differ = [  # paths as resolved: a run may be resumed from another folder than it started in
        f"{key} {now['config'][key]!r} (was {value!r})"
        for key, value in recorded["config"].items()
        if key not in PATHS and now["config"].get(key) != value
    ]
    if recorded["data"]["sha256"] != now["data"]["sha256"]:
        differ.append(f"data {now['data']['path']} (its sha256 differs from the interrupted run's)")
    differ += base_mismatches(recorded["base"], now["base"])
    if differ:
        raise UserError(f"{run_folder}: cannot resume, this run differs from the interrupted one: {'; '.join(differ)}")


def same(key: str, value: Any, recorded: Any) -> bool:
    """Whether a setting given now is the recorded one: paths (`PATHS`) compared as resolved."""
    if key in PATHS and value is not None and recorded is not None:
        return Path(value).expanduser().resolve() == Path(recorded).expanduser().resolve()
    return value == recorded


def read_run_record(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD
    try:
        record = parse_json(read_bytes(path, MAX_RECORD_BYTES, "run record").decode("utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a run record (a JSON object), got {type(record).__name__}")
    for key, want in RECORD_SHAPE.items():
        if not isinstance(record.get(key), want):
            raise UserError(f"{path}: not a run record ('{key}' must be {'a string' if want is str else 'an object'})")
    if not isinstance(record["data"].get("sha256"), str):
        raise UserError(f"{path}: not a run record ('data' has no 'sha256')")
    return record


RECORD_SHAPE = {"task": str, "output": str, "config": dict, "data": dict, "base": dict}  # what check_resume reads


def _task_of(folder: Path) -> str | None:
    try:
        return read_run_record(folder).get("task")
    except UserError:
        return None


def _wait_for_everyone(processes: PartialState | None) -> None:
    if processes is not None:
        processes.wait_for_everyone()
