"""The command-line parser: training flags generated from config.RunConfig's fields, one subcommand per command."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..core import commands, registry, report
from ..core.config import RunConfig, settings, task_defaults


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
    fields = [f for f in settings(task) if f.name not in exclude]
    _add_fields(parser, fields, typing.get_type_hints(RunConfig), task_defaults(task), recipe_stands=True)
    if not one_run:
        return
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument(
        "--resume",
        metavar="PATH|latest",
        help="continue an interrupted run: its --output folder (or checkpoint), or the latest one under adapters/",
    )


def _add_fields(
    parser: argparse.ArgumentParser,
    fields: list[dataclasses.Field],
    hints: dict[str, Any],
    defaults: dict[str, Any],
    recipe_stands: bool,
) -> None:
    """A flag for each field (`config.setting`'s help, choices, type; a bool is a switch). `recipe_stands`: a flag
    left out is None, so that the recipe's value stands (training); else the field's default (`commands`)."""
    for field in fields:
        flag, meta, default = "--" + field.name.replace("_", "-"), field.metadata, defaults[field.name]
        shown = "" if default is None or "default:" in meta["help"] or not recipe_stands else f" (default: {default})"
        options: dict[str, Any] = {"help": meta["help"] + shown, "default": None if recipe_stands else default}
        kind = next((h for h in typing.get_args(hints[field.name]) if h is not type(None)), hints[field.name])
        if meta["choices"]:
            options["choices"] = meta["choices"]
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction if recipe_stands else "store_true"
        elif typing.get_origin(kind) is list:
            options["nargs"] = "+"
        else:
            options["type"] = kind
        if meta["required"]:
            options["required"] = True
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        short = (meta["flag"],) if meta["flag"] else ()  # `--from` for `from_adapter`
        parser.add_argument(*short, flag, dest=field.name, **options)


def _add_options(parser: argparse.ArgumentParser, kind: type) -> None:
    """A flag for each of a command's options (`commands`), defaulting to the field's default."""
    fields = dataclasses.fields(kind)
    _add_fields(parser, list(fields), typing.get_type_hints(kind), {f.name: f.default for f in fields}, False)


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="instruction-tuned adapter folder")
    parser.add_argument("--max-new-tokens", type=int, help="longest response in tokens (default: the adapter's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, with --temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    _add_force(parser)


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="adapter", help="adapter folders; each is named by its folder")
    _add_options(parser, commands.ServeOptions)
    _add_options(parser, commands.ServeLimits)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, exit code 2, like every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, report.one_line(f"error: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora_ft", description="LoRA fine-tuning of GPT-2 with PEFT.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for task in registry.TASKS.values():
        _add_train_flags(subcommands.add_parser(task.name, help=task.help), task.name)
    _add_answering(subcommands)
    _add_adapter_files(subcommands)
    _add_the_rest(subcommands)
    for sub in subcommands.choices.values():
        _add_common(sub)
    return parser


def _add_answering(subcommands: Any) -> None:
    """The commands that use an adapter: generate, chat, predict, eval."""
    generate = subcommands.add_parser("generate", help="answer instructions with an instruction-tuned adapter")
    _add_generation_flags(generate)
    generate.add_argument("--instruction", help="the instruction")
    generate.add_argument("--input", default="", help="its input (optional)")
    generate.add_argument(
        "--file",
        help="JSONL of {instruction, input}, {prompt} or {messages} objects, or a .json list ('-' for standard input)",
    )
    generate.add_argument("--json", action="store_true", help="one object per line, with a 'response' key")

    chat = subcommands.add_parser("chat", help="type instructions, read answers (an empty line or Ctrl-D ends)")
    _add_generation_flags(chat)

    predict = subcommands.add_parser("predict", help="label texts with a trained classifier adapter")
    predict.add_argument("adapter", help="adapter folder")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--file", help="a file with one text per line ('-' for standard input)")
    predict.add_argument("--json", action="store_true", help='one {"text", "label", "score"} object per line')
    _add_force(predict)

    evaluate = subcommands.add_parser(
        "eval", help="recompute an adapter's test metrics from its manifest; of two, test their difference"
    )
    evaluate.add_argument(
        "adapters", nargs="+", metavar="adapter", help="adapter folder; two: both on their (same) test split, compared"
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_force(evaluate)


def _add_adapter_files(subcommands: Any) -> None:
    """The commands that read or write adapter folders and recipes: merge, adapters, inspect, recipes."""
    merge = subcommands.add_parser("merge", help="fold an adapter into its base and write a standalone model")
    merge.add_argument("adapter", help="adapter folder")
    _add_options(merge, commands.MergeOptions)

    listing = subcommands.add_parser("adapters", help="list the adapters (and merged exports) in a folder")
    listing.add_argument(
        "folder", nargs="?", default="adapters", help="where to look, at any depth (default: adapters)"
    )
    listing.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    inspect = subcommands.add_parser("inspect", help="show an adapter's (or export's) manifest, readably")
    inspect.add_argument("adapter", help="adapter or merged-export folder")
    inspect.add_argument("--json", action="store_true", help="the manifest as it is stored")

    recipes = subcommands.add_parser("recipes", help="list the recipes shipped with lora_ft, or copy one out to edit")
    recipes.add_argument(
        "action",
        nargs="?",
        choices=("ls", "cp", "copy"),
        default="ls",
        help="ls (the default): list them; cp (or copy): copy NAME to DEST",
    )
    recipes.add_argument("name", nargs="?", help="cp: the recipe, by the name `ls` shows (spam-qlora, compare/...)")
    recipes.add_argument("dest", nargs="?", help="cp: the file to write (or a folder to write it into); never replaced")


def _add_the_rest(subcommands: Any) -> None:
    """compare, serve, studio, bench: their own options (`commands`), and compare's shared training settings."""
    compare = subcommands.add_parser(
        "compare", help="train several methods or ranks on the same data and seed; a table and a Pareto plot"
    )
    compare.add_argument("task", choices=registry.NAMES, help="the task to train")
    _add_options(compare, commands.CompareOptions)
    _add_train_flags(compare, None, exclude=("method", "lora_r", "output"), one_run=False)

    _add_serve(subcommands.add_parser("serve", help="serve adapters over an OpenAI-compatible HTTP API and a web page"))
    _add_options(
        subcommands.add_parser("studio", help="a web page to train, watch, compare and try adapters"),
        commands.StudioOptions,
    )

    bench = subcommands.add_parser("bench", help="measure training speed and memory: lora_ft vs naive vs full FT")
    _add_options(bench, commands.BenchOptions)
