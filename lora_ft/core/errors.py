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
    """Training stopped on a signal (SIGINT, SIGTERM), with `checkpoint` (at `step`) to resume from, if it has one.
    `evaluating`: the step whose evaluation the signal cut short (that step's checkpoint was not saved). A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up swallows it. Exit code
    128 + the signal."""

    def __init__(
        self, signum: int, step: int | None = None, checkpoint: Path | None = None, evaluating: int | None = None
    ):
        self.signal_name = signal.Signals(signum).name
        self.code = 128 + signum
        self.step, self.checkpoint, self.evaluating = step, checkpoint, evaluating
        super().__init__(self.signal_name + self.where())

    def where(self) -> str:
        """Where training stopped, for a person: '' when it did not reach training."""
        kept = f"checkpoint at step {self.step} kept" if self.checkpoint else "no checkpoint yet"
        if self.evaluating is not None:
            return f" during the evaluation at step {self.evaluating} ({kept})"
        return f" at step {self.step}, checkpoint saved" if self.checkpoint else ""


class RunKept(BaseException):
    """A training run stopped by `error` (bad input found late, a signal, a crash) with its checkpoints kept in `folder`
    (its `.partial` folder), so that `--resume` can continue it. Raised from `error`; a BaseException, like the
    `Interrupted` it may carry."""

    def __init__(self, folder: Path, error: BaseException):
        super().__init__(f"{error} (checkpoints kept in {folder})")
        self.folder, self.error = folder, error
