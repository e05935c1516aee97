"""The options of the commands that are not training runs (merge, serve, studio, bench, compare), each declared once
as a field, as training's settings are in `config.RunConfig`: its default, its help and its check (`config.setting`).
The parser makes every flag from these fields, the CLI builds the dataclass from the parsed flags and `check`s it
before anything loads, and the library's defaults are these. Here, in core, so that `--help` loads no torch."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

from . import registry
from .config import BENCH_MODELS, POSITIVE, check_value, setting
from .errors import UserError

MERGE_DTYPES = ("float32", "float16", "bfloat16")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # gguf_export.QTYPES's keys
AT_LEAST_ONE = (lambda v: v >= 1, "must be >= 1")
PORT = (lambda v: 0 <= v <= 65535, "must be in [0, 65535]")  # the socket layer would take it modulo 65536
SECONDS = (lambda v: 0 < v <= 3600, "must be in (0, 3600] seconds")
# A key as an HTTP header carries it: any other could never match (the key itself is never shown).
HEADER_KEY = (
    lambda v: v.isascii() and v.isprintable() and v == v.strip() != "",
    "must be printable ASCII, with no space at either end: HTTP headers carry nothing else",
)
KEY_HELP = "require `Authorization: Bearer KEY`"


@dataclass(frozen=True)
class MergeOptions:
    output: str = setting(None, "folder to write the merged model to", required=True)
    dtype: str = setting("float32", "weights dtype", choices=MERGE_DTYPES)
    base: str | None = setting(None, "base model to merge into (default: the one the adapter names)")
    overwrite: bool = setting(False, "replace an existing --output folder")
    force: bool = setting(False, "use a base that differs from the adapter's")
    tolerance: float = setting(1e-4, "largest logit difference allowed against base + adapter", check=POSITIVE)
    gguf: str | None = setting(
        None,
        "also write OUTPUT/<name>.gguf in this type (llama.cpp, Ollama) and a Modelfile, read back and checked",
        choices=GGUF_TYPES,
    )
    gguf_adapter: bool = setting(
        False,
        "also write the adapter alone as a GGUF LoRA, OUTPUT/<name>.lora.gguf (llama.cpp --lora), --gguf's type",
    )


@dataclass(frozen=True)
class ServeLimits:
    """`serve`'s limits on requests."""

    max_batch_size: int = setting(
        16, "most texts or prompts in one forward pass, and in one request", check=AT_LEAST_ONE
    )
    queue_size: int = setting(256, "most requests waiting per base; more are answered 503", check=AT_LEAST_ONE)
    max_tokens: int = setting(512, "most new tokens a request may ask for", check=AT_LEAST_ONE)
    max_input_chars: int = setting(20_000, "longest text, prompt or message, in characters", check=AT_LEAST_ONE)
    batch_wait_ms: float = setting(
        5.0,
        "how long a batch's first request waits for others to join it",
        check=(lambda v: 0 <= v <= 1000, "must be in [0, 1000]"),
    )

    def check(self) -> ServeLimits:
        return check(self)


@dataclass(frozen=True)
class ServeOptions:
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "port to listen on (0: any free port, printed)", check=PORT)
    api_key: str | None = setting(
        None, f"{KEY_HELP} on /v1/ requests (default: $LORA_FT_API_KEY, if set)", check=HEADER_KEY, secret=True
    )
    allowed_host: list[str] | None = setting(
        None,
        "without --api-key, also answer requests for these Host names (besides localhost and IP addresses; '*': any)",
        metavar="NAME",
    )
    header_timeout: float = setting(
        10.0, "seconds a request's head may take to arrive, from the connection's opening", check=SECONDS
    )
    body_timeout: float = setting(60.0, "seconds a request's body may take to arrive, after its head", check=SECONDS)


@dataclass(frozen=True)
class StudioOptions:
    workspace: str = setting(".", "folder of the runs, their adapters and data (default: .)")
    host: str = setting("127.0.0.1", "address to listen on (another than loopback: --api-key)")
    port: int = setting(7860, "port to listen on (0: any free port, printed)", check=PORT)
    api_key: str | None = setting(
        None, f"{KEY_HELP} (default: $LORA_FT_API_KEY, if set)", check=HEADER_KEY, secret=True
    )
    parallel: int = setting(1, "runs trained at the same time (default: 1)", check=AT_LEAST_ONE)
    max_upload_mb: float = setting(64.0, "largest data file an upload may be", check=POSITIVE)


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = setting(False, "time a few steps per setup, extrapolate each epoch")
    inference: bool = setting(False, "measure predict and generate instead (vs naive loops)")
    serve: list[str] | None = setting(
        None, "measure `serve` on these adapters: batched vs one at a time", metavar="ADAPTER"
    )
    task: str = setting("spam", "the task whose training is measured (default: spam)", choices=registry.NAMES)
    model: str = setting(
        "gpt2",
        "the architecture trained, with random weights (no download; default: gpt2, GPT-2 124M)",
        choices=tuple(BENCH_MODELS),
    )
    json: str | None = setting(None, "also write the figures to this JSON file")
    tokenizer: str | None = setting(None, "GPT-2 tokenizer: Hub id or folder (default: the copy shipped with lora_ft)")
    data: str | None = setting(
        None, "the task's data file (default: $LORA_FT_DATA_DIR, then the copy shipped with lora_ft)"
    )
    seed: int = setting(123, "seed for the split, the weights and the order")


@dataclass(frozen=True)
class CompareOptions:
    """compare's own flags; the training settings shared by every run come from `RunConfig` (but these)."""

    methods: str | None = setting(None, "comma-separated: lora,dora,ia3,vera,full (default: lora)")
    lora_r: str | None = setting(None, "comma-separated ranks for the methods that have one (default: the recipe's)")
    runs: str | None = setting(None, "a YAML list of recipe mappings (each with an optional name), instead")
    seeds: str | None = setting(
        None, "train each run once per seed: N seeds from the recipe's seed on, or a comma-separated list"
    )
    output: str | None = setting(None, "folder of the runs and results (default: adapters/compare-TASK)")


def check(options: Any) -> Any:
    """`options`, each value checked as a recipe's are (type, a finite number, the field's check)."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        check_value("command line", field.name, getattr(options, field.name), field, hints[field.name], flag=True)
    return options


def from_flags(kind: type, flags: Any) -> Any:
    """A `kind` from the parsed flags (an argparse namespace), checked."""
    return check(kind(**{f.name: getattr(flags, f.name) for f in dataclasses.fields(kind)}))


def api_key(given: str | None) -> str | None:
    """--api-key as given (checked with the flags), else $LORA_FT_API_KEY (unset or empty: no key), checked too."""
    if given is not None:
        return given
    found = os.environ.get("LORA_FT_API_KEY") or None
    if found is not None and not HEADER_KEY[0](found):
        raise UserError(f"$LORA_FT_API_KEY {HEADER_KEY[1]}")
    return found
