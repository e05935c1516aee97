"""The command-line parser: training flags generated from config.RunConfig's fields, one subcommand per command."""

from __future__ import annotations

import argparse
import os
import typing
from typing import Any

from . import tasks
from .config import BENCH_MODELS, RunConfig, ServeLimits, settings, task_defaults
from .errors import UserError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    parser.add_argument("--quiet", action="store_true", help="print only the final results and errors")


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="use a base that differs from the adapter's")


def _add_train_flags(
    parser: argparse.ArgumentParser, task: str | None, exclude: tuple[str, ...] = (), one_run: bool = True
) -> None:
    """A flag for every setting `task` reads (every task's, for None; config.RunConfig's fields, with their help and
    the task's defaults) but those in `exclude`; left out, a flag is None and the recipe's value stands. `one_run`:
    also --overwrite and --resume."""
    parser.add_argument(
        "--config", help="recipe: a YAML file, or a shipped recipe's name (see `recipes`); flags given here override it"
    )
    defaults, hints = task_defaults(task), typing.get_type_hints(RunConfig)
    for field in (f for f in settings(task) if f.name not in exclude):
        flag, meta, default = "--" + field.name.replace("_", "-"), field.metadata, defaults[field.name]
        shown = "" if default is None or "default:" in meta["help"] else f" (default: {default})"
        options: dict[str, Any] = {"help": meta["help"] + shown, "default": None}
        kind = next((h for h in typing.get_args(hints[field.name]) if h is not type(None)), hints[field.name])
        if meta["choices"]:
            options["choices"] = meta["choices"]
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options["nargs"] = "+"
        else:
            options["type"] = kind
        short = (meta["flag"],) if meta["flag"] else ()  # `--from` for `from_adapter`
        parser.add_argument(*short, flag, dest=field.name, **options)
    if not one_run:
        return
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument(
        "--resume",
        metavar="PATH|latest",
        help="continue an interrupted run: its --output folder (or checkpoint), or the latest one under adapters/",
    )


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="instruction-tuned adapter folder")
    parser.add_argument("--max-new-tokens", type=int, help="longest response in tokens (default: the adapter's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, with --temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    _add_force(parser)


def _add_serve(parser: argparse.ArgumentParser) -> None:
    defaults = ServeLimits()
    parser.add_argument("adapters", nargs="+", metavar="adapter", help="adapter folders; each is named by its folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    parser.add_argument(
        "--api-key",
        type=_api_key,
        help="require `Authorization: Bearer KEY` on /v1/ requests (default: $LORA_FT_API_KEY, if set)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="without --api-key, also answer requests for this Host name (besides localhost and IP addresses; repeat "
        "for more; '*': any)",
    )
    timeouts = {
        "--header-timeout": (10.0, "seconds a request's head may take to arrive, from the connection's opening"),
        "--body-timeout": (60.0, "seconds a request's body may take to arrive, after its head"),
    }
    for flag, (seconds, text) in timeouts.items():
        parser.add_argument(flag, type=_seconds, default=seconds, metavar="SECONDS", help=text)
    limits = {
        "--max-batch-size": (int, "most texts or prompts in one forward pass, and in one request"),
        "--queue-size": (int, "most requests waiting per base; more are answered 503"),
        "--max-tokens": (int, "most new tokens a request may ask for"),
        "--max-input-chars": (int, "longest text, prompt or message, in characters"),
        "--batch-wait-ms": (float, "how long a batch's first request waits for others to join it"),
    }
    for flag, (kind, text) in limits.items():
        parser.add_argument(flag, type=kind, default=getattr(defaults, flag[2:].replace("-", "_")), help=text)


def _add_studio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=".", help="folder of the runs, their adapters and data (default: .)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback: --api-key)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port, printed)")
    parser.add_argument(
        "--api-key",
        type=_api_key,
        help="require `Authorization: Bearer KEY` (default: $LORA_FT_API_KEY, if set)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at the same time (default: 1)")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest data file an upload may be")


def _api_key(key: str) -> str:
    """A key as an HTTP header carries it: printable ASCII, no space at either end (any other could never match)."""
    if not (key.isascii() and key.isprintable() and key == key.strip() != ""):
        said = "is empty" if key == "" else "holds a character other than printable ASCII, or a space at an end"
        raise argparse.ArgumentTypeError(f"the key {said}: HTTP headers carry printable ASCII")
    return key


def api_key(given: str | None) -> str | None:
    """--api-key as given (checked as it was parsed), else $LORA_FT_API_KEY (unset or empty: no key), checked too."""
    found = given if given is not None else os.environ.get("LORA_FT_API_KEY") or None
    try:
        return found if given is not None or found is None else _api_key(found)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"$LORA_FT_API_KEY: {e}") from None


def _seconds(text: str) -> float:
    seconds = float(text)
    if not 0 < seconds <= 3600:  # NaN and inf too
        raise argparse.ArgumentTypeError(f"must be in (0, 3600] seconds, got {text}")
    return seconds


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, exit code 2, like every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora_ft", description="LoRA fine-tuning of GPT-2 with PEFT.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for task in tasks.TASKS.values():
        _add_train_flags(commands.add_parser(task.name, help=task.help), task.name)

    generate = commands.add_parser("generate", help="answer instructions with an instruction-tuned adapter")
    _add_generation_flags(generate)
    generate.add_argument("--instruction", help="the instruction")
    generate.add_argument("--input", default="", help="its input (optional)")
    generate.add_argument(
        "--file",
        help="JSONL of {instruction, input}, {prompt} or {messages} objects, or a .json list ('-' for standard input)",
    )
    generate.add_argument("--json", action="store_true", help="one object per line, with a 'response' key")

    chat = commands.add_parser("chat", help="type instructions, read answers (an empty line or Ctrl-D ends)")
    _add_generation_flags(chat)

    predict = commands.add_parser("predict", help="label texts with a trained classifier adapter")
    predict.add_argument("adapter", help="adapter folder")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--file", help="a file with one text per line ('-' for standard input)")
    predict.add_argument("--json", action="store_true", help='one {"text", "label", "score"} object per line')
    _add_force(predict)

    evaluate = commands.add_parser(
        "eval", help="recompute an adapter's test metrics from its manifest; of two, test their difference"
    )
    evaluate.add_argument(
        "adapters", nargs="+", metavar="adapter", help="adapter folder; two: both on their (same) test split, compared"
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_force(evaluate)

    merge = commands.add_parser("merge", help="fold an adapter into its base and write a standalone model")
    merge.add_argument("adapter", help="adapter folder")
    merge.add_argument("--output", required=True, help="folder to write the merged model to")
    merge.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weights dtype")
    merge.add_argument("--base", help="base model to merge into (default: the one the adapter names)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    _add_force(merge)
    merge.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest logit difference allowed against base + adapter"
    )
    merge.add_argument(
        "--gguf",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="also write OUTPUT/<name>.gguf in this type (llama.cpp, Ollama) and a Modelfile, read back and checked",
    )
    merge.add_argument(
        "--gguf-adapter",
        action="store_true",
        help="also write the adapter alone as a GGUF LoRA, OUTPUT/<name>.lora.gguf (llama.cpp --lora), --gguf's type",
    )

    listing = commands.add_parser("adapters", help="list the adapters (and merged exports) in a folder")
    listing.add_argument(
        "folder", nargs="?", default="adapters", help="where to look, at any depth (default: adapters)"
    )
    listing.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    inspect = commands.add_parser("inspect", help="show an adapter's (or export's) manifest, readably")
    inspect.add_argument("adapter", help="adapter or merged-export folder")
    inspect.add_argument("--json", action="store_true", help="the manifest as it is stored")

    recipes = commands.add_parser("recipes", help="list the recipes shipped with lora_ft, or copy one out to edit")
    recipes.add_argument(
        "action",
        nargs="?",
        choices=("ls", "cp", "copy"),
        default="ls",
        help="ls (the default): list them; cp (or copy): copy NAME to DEST",
    )
    recipes.add_argument("name", nargs="?", help="cp: the recipe, by the name `ls` shows (spam-qlora, compare/...)")
    recipes.add_argument("dest", nargs="?", help="cp: the file to write (or a folder to write it into); never replaced")

    compare = commands.add_parser(
        "compare", help="train several methods or ranks on the same data and seed; a table and a Pareto plot"
    )
    compare.add_argument("task", choices=tasks.NAMES, help="the task to train")
    compare.add_argument("--methods", help="comma-separated: lora,dora,ia3,vera,full (default: lora)")
    compare.add_argument(
        "--lora-r", dest="ranks", help="comma-separated ranks for the methods that have one (default: the recipe's)"
    )
    compare.add_argument("--runs", help="a YAML list of recipe mappings (each with an optional name), instead")
    compare.add_argument(
        "--seeds", help="train each run once per seed: N seeds from the recipe's seed on, or a comma-separated list"
    )
    compare.add_argument(
        "--output", dest="compare_output", help="folder of the runs and results (default: adapters/compare-TASK)"
    )
    _add_train_flags(compare, None, exclude=("method", "lora_r", "output"), one_run=False)

    _add_serve(commands.add_parser("serve", help="serve adapters over an OpenAI-compatible HTTP API and a web page"))
    _add_studio(commands.add_parser("studio", help="a web page to train, watch, compare and try adapters"))

    bench = commands.add_parser("bench", help="measure training speed and memory: lora_ft vs naive vs full FT")
    bench.add_argument("--quick", action="store_true", help="time a few steps per setup, extrapolate each epoch")
    bench.add_argument("--inference", action="store_true", help="measure predict and generate instead (vs naive loops)")
    bench.add_argument(
        "--serve", nargs="+", metavar="ADAPTER", help="measure `serve` on these adapters: batched vs one at a time"
    )
    bench.add_argument(
        "--task", choices=tasks.NAMES, default="spam", help="the task whose training is measured (default: spam)"
    )
    bench.add_argument(
        "--model",
        choices=tuple(BENCH_MODELS),
        default="gpt2",
        help="the architecture trained, with random weights (no download; default: gpt2, GPT-2 124M)",
    )
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument("--tokenizer", help="GPT-2 tokenizer: Hub id or folder (default: the copy shipped with lora_ft)")
    bench.add_argument(
        "--data", help="the task's data file (default: $LORA_FT_DATA_DIR, then the copy shipped with lora_ft)"
    )
    bench.add_argument("--seed", type=int, default=123, help="seed for the split, the weights and the order")

    for sub in commands.choices.values():
        _add_common(sub)
    return parser
