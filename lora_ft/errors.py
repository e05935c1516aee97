"""The exceptions the CLI turns into exit codes: bad input (2) and an interrupted run (130 / 143); and the one that
says a stopped training run was kept for `--resume`."""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """Bad input, usage or environment. The CLI prints its message on one line and exits with `code`. A message
    names a setting as `name` (a RunConfig field or a function's argument); the CLI shows it as its flag, --name."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """Training stopped on a signal (SIGINT, SIGTERM) after saving a checkpoint at `step`. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way up swallows it. Exit code 128 + the signal."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signal_name = signal.Signals(signum).name
        self.code = 128 + signum
        self.step, self.checkpoint = step, checkpoint
        at = f" at step {step}, checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"{self.signal_name}{at}")


class RunKept(BaseException):
    """A training run stopped by `error` (bad input found late, a signal, a crash) with its checkpoints kept in `folder`
    (its `.partial` folder), so that `--resume` can continue it. Raised from `error`; a BaseException, like the
    `Interrupted` it may carry."""

    def __init__(self, folder: Path, error: BaseException):
        super().__init__(f"{error} (checkpoints kept in {folder})")
        self.folder, self.error = folder, error
