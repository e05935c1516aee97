"""How transformers reads GGUF files for lora_ft: its progress bar lora_ft's, and each file parsed once where a
model and its tokenizer are built from it together."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from ..core import progress

_ONE_AT_A_TIME = threading.RLock()  # threads that load at once (serve, studio) must not restore each other's reader


@contextlib.contextmanager
def bar_as_lora_fts() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own, unconditionally (hundreds of carriage returns in a log
    file): while it runs, its bar is lora_ft's, which follows `progress` (a line in a log, nothing when off)."""
    from transformers import modeling_gguf_pytorch_utils as reader

    own = reader.tqdm
    reader.tqdm = lambda iterable, desc="", **_: progress.bar(iterable, desc="reading the GGUF weights", unit="tensor")
    try:
        yield
    finally:
        reader.tqdm = own


@contextlib.contextmanager
def each_file_parsed_once() -> Iterator[None]:
    """While open, each GGUF file is parsed once. transformers parses the whole file again for each thing it builds
    from it (the config, the tokenizer, the weights), and a parse reads the tokenizer's 100,000 strings one by one
    in Python: about 3 s each for GPT-2's or SmolLM2's vocabulary, so a model with its tokenizer took four. For
    reads of a file that does not change meanwhile: a base loaded, an export read back by its check. Opened inside
    another, it reads through the outer one's, so the outer's parses are shared (a run's tokenizer and base)."""

    import gguf

    with _ONE_AT_A_TIME:
        own, parsed = gguf.GGUFReader, {}

        def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
            key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
            if key not in parsed:
                parsed[key] = own(path, *args, **kwargs)
            return parsed[key]

        gguf.GGUFReader = reader  # transformers imports it at each read, inside its loader
        try:
            yield
        finally:
            gguf.GGUFReader = own
