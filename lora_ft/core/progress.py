"""Progress of long steps, for a person watching: tqdm bars redrawn in place on a terminal; elsewhere (CI, a log file)
a plain line now and then instead of thousands of carriage returns. Off until `enable` is called (the CLI does;
library code shows nothing by itself), so that `bar` is always safe to wrap around a loop."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

LINE_SECONDS = 30.0  # without a terminal, a progress line at most this often (and at the end)
_mode = "off"  # "off" | "bars" | "lines"
_stream: TextIO | None = None  # None: sys.stderr as it is when written to (a test may swap it)


def enable(mode: str = "auto", stream: TextIO | None = None) -> None:
    """ "auto": bars on a terminal, lines elsewhere; or "bars", "lines", "off". Output goes to `stream` (stderr)."""
    global _mode, _stream
    _stream = stream
    _mode = ("bars" if _out().isatty() else "lines") if mode == "auto" else mode


def _out() -> TextIO:
    return _stream or sys.stderr


class _Notices(logging.Handler):
    """lora_ft's log records (notices, one line per evaluation) as plain lines, above any bar on the screen."""

    def emit(self, record: logging.LogRecord) -> None:
        write(record.getMessage() if record.levelno < logging.WARNING else f"note: {record.getMessage()}")


def show(quiet: bool = False) -> None:
    """For a program that shows a person what lora_ft does (the CLI): bars (see `enable`) and lora_ft's notices on
    stderr; with `quiet`, neither, only errors."""
    enable("off" if quiet else "auto")
    logger = logging.getLogger("lora_ft")
    logger.handlers = [_Notices()]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False


def on_terminal() -> bool:
    """Bars are being drawn on a terminal (where a tool's own progress display is welcome too)."""
    return _mode == "bars"


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    hidden: bool = False,
    transient: bool = False,
) -> Any:
    """A progress bar (tqdm's interface: update, set_postfix_str, close, a context manager, iteration); `hidden` for
    steps too short to be worth one; a `transient` bar leaves the terminal's screen when it closes."""
    if _mode == "bars" and not hidden:
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=_out(),
            dynamic_ncols=True,
            leave=not transient,
        )
    return _Lines(iterable, total, desc, unit, initial, quiet=_mode == "off" or hidden)


def write(text: str) -> None:
    """A line for the person watching, above any bar on the screen."""
    if _mode == "bars":
        tqdm.write(text, file=_out())
    else:
        print(text, file=_out(), flush=True)


class _Lines:
    """tqdm's meter text (count, elapsed, ETA, rate) as a whole line at most every LINE_SECONDS, and at the end."""

    def __init__(
        self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str, initial: int, quiet: bool
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.n = iterable, total, desc, unit, initial
        self.quiet, self.postfix, self.closed = quiet, "", False
        self.start = self.shown = time.monotonic()
        self.initial = initial

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.shown >= LINE_SECONDS:
            self._show()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._show()

    def _show(self) -> None:
        self.shown = time.monotonic()
        if self.quiet:
            return
        line = tqdm.format_meter(
            self.n,
            self.total,
            self.shown - self.start,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            initial=self.initial,
            ncols=0,  # the counts and times, without a bar drawn in characters
        )
        print(line, file=_out(), flush=True)


def quiet_libraries() -> None:
    """The ML libraries' own logs, warnings and bars off (a command shows its own; `--debug` keeps theirs)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    # bitsandbytes asks the `kernels` package for its CPU kernels at import; offline, kernels warns that it skipped a
    # trust check (a line on stderr before lora_ft's own one-line error)
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight loading; Trainer's own bars stay
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()  # download retries; the one-line error says it all
