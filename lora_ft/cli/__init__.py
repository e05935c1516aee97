"""Command line: parse arguments, call the library, report. The one place that prints and picks exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..core import commands, progress, registry, report
from ..core.config import RunConfig, settings
from ..core.errors import Interrupted, RunKept, UserError
from .parser import build_parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given)."""
    return {field.name: getattr(args, field.name) for field in settings(args.command)}


def _main_process() -> bool:
    """Whether this process reports: of several started by torchrun or `accelerate launch`, which all meet the same
    results, bad input or interrupt, only the main one (global rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def _train_config(task: str, args: argparse.Namespace) -> tuple[RunConfig, Path | None]:
    """The run's config and, with --resume, the checkpoint to continue from. A resumed run takes the interrupted
    run's own config; flags given with --resume must agree with it."""
    from ..core.config import load_config, validate
    from ..engine import runs

    if args.resume is None:
        return load_config(task, args.config, _overrides(args)), None
    if args.config:
        raise UserError("--resume continues a run with the config it was started with; leave out --config")
    root = Path(args.output).parent if args.output else runs.ADAPTERS_DIR
    run = runs.find_run(args.resume, task, root)
    own = {k: v for k, v in run.record["config"].items() if k in {f.name for f in settings(task)}}
    recorded = run.record["config"] | validate(own, str(run.folder / runs.RUN_RECORD), task)
    recorded["output"] = str(runs.output_of(run.folder))  # where the run is, whatever folder it was started from
    given = validate({k: v for k, v in _overrides(args).items() if v is not None}, "command line", task)
    differ = [
        f"--{k.replace('_', '-')} {v} (was {recorded[k]})" for k, v in given.items() if not runs.same(k, v, recorded[k])
    ]
    if differ:
        raise UserError(f"--resume {args.resume}: differs from the interrupted run: {', '.join(differ)}")
    return RunConfig(**recorded), run.checkpoint


def run_train(args: argparse.Namespace) -> int:
    """Any task's training command: its config (recipe, flags, or the interrupted run's), its run, its summary."""
    config, resume = _train_config(args.command, args)  # first: a bad setting is told before torch is imported
    from ..tasks import task_code

    task = task_code.get(args.command)
    result = task.train(config, overwrite=args.overwrite, resume=resume)
    if _main_process():
        print("\n".join(task.summary(result.manifest, result.adapter_dir)))
    return 0


def _read_texts(args: argparse.Namespace) -> Iterable[str]:
    """The arguments, then --file's non-blank lines, read as `predict` needs them (it streams)."""
    from .. import data

    texts: Iterator[str] = iter(args.texts)
    if args.file:
        texts = itertools.chain(texts, (line for line in data.input_lines(args.file) if line.strip()))
    first = next(texts, None)
    if first is None:
        raise UserError("nothing to classify: give TEXT arguments, --file F, or --file - for standard input")
    return itertools.chain([first], texts) if args.file else [first, *texts]


def run_predict(args: argparse.Namespace) -> int:
    from ..tasks import task_code

    count = truncated = 0
    for p in task_code.classifier().predict_stream(args.adapter, _read_texts(args), force=args.force):
        count, truncated = count + 1, truncated + p.truncated
        if args.json:
            record = {"text": p.text, "label": p.label, "score": round(p.score, 6), "truncated": p.truncated}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"{p.label}\t{p.score:.4f}\t{p.text}")
    if truncated:
        print(
            f"note: {truncated} of {count} texts are longer than the adapter's max_length tokens and "
            "were labelled from their beginning",
            file=sys.stderr,
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..tasks import evaluation, task_code

    if len(args.adapters) > 2:
        raise UserError(f"eval takes one adapter, or two to compare; got {len(args.adapters)}")
    if len(args.adapters) == 2:
        result = evaluation.compare_pair(*args.adapters, force=args.force)
        print(json.dumps(result, indent=2) if args.json else "\n".join(report.paired(result)))
        return 0
    evaluated = evaluation.evaluate(args.adapters[0], args.force)
    metrics, manifest = evaluated.metrics, evaluated.manifest
    same = evaluation.matches_manifest(evaluated)
    if args.json:
        print(json.dumps({"test": metrics, "matches_manifest": same}, indent=2))
    else:
        print(report.metrics_table({"test": metrics}, task_code.get(manifest.task).EVAL_COLUMNS))
        if "confusion_matrix" in metrics:
            labels = manifest.label_names
            print(f"confusion matrix (rows: true {labels}, columns: predicted): {metrics['confusion_matrix']}")
        print("matches the manifest" if same else f"DIFFERS from the manifest: {manifest.metrics['test']}")
    return 0 if same else 1


def _read_requests(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .. import data
    from ..data import chat

    if args.input and not args.instruction:
        raise UserError("--input goes with --instruction")
    requests = [{"instruction": args.instruction, "input": args.input}] if args.instruction else []
    if args.file:
        requests += chat.read_requests(*data.read_input(args.file, stdin_name="<stdin>.jsonl"))
    if not requests:
        raise UserError("nothing to answer: give --instruction TEXT, --file F, or --file - for standard input")
    return requests


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    from ..engine import generation

    return generation.check_sampling(args.max_new_tokens, args.temperature, args.top_p)


def run_generate(args: argparse.Namespace) -> int:
    from ..tasks import task_code

    requests = _read_requests(args)
    answers = task_code.generator().respond(args.adapter, requests, seed=args.seed, force=args.force, **_sampling(args))
    for request, answer in zip(requests, answers, strict=True):
        if args.json:
            record = {**request, "response": answer.response, "stopped_at_eos": answer.stopped_at_eos}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(answer.response + ("" if answer.stopped_at_eos else " [cut at --max-new-tokens]"))
            if len(requests) > 1:
                print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from .. import data
    from ..data import chat
    from ..engine import generation
    from ..tasks import task_code

    sampling = _sampling(args)
    loaded = task_code.generator().load(args.adapter, force=args.force)
    set_seed(args.seed)
    limit = sampling.pop("max_new_tokens") or (loaded.manifest.generation or {})["max_new_tokens"]
    ask = "instruction> " if sys.stdin.isatty() else ""
    history: list[dict[str, str]] = []  # a chat-trained adapter sees the conversation; others, the last line
    for line in data.typed_lines(lambda: input(ask)):
        history.append({"role": "user", "content": line})
        prompt = chat.render_prompt(loaded.manifest, loaded.tokenizer, {"messages": history})
        (answer,) = generation.generate(loaded.model, loaded.tokenizer, [prompt], limit, **sampling)
        history.append({"role": "assistant", "content": answer.response})
        print(answer.response, flush=True)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..export import merge

    options = commands.from_flags(commands.MergeOptions, args)
    result = merge.merge(args.adapter, **dataclasses.asdict(options))
    section = result.manifest.merge
    check = section["check"]
    for mismatch in section["base_mismatches_forced"]:
        print(f"warning: --force: base differs from the adapter's ({mismatch})", file=sys.stderr)
    print(f"merged {args.adapter} into {section['base']['location']} -> {result.output} ({args.dtype})")
    print(
        f"checked on {check['inputs']}: max |logit difference| against base + adapter "
        f"{check['max_abs_logit_diff_float32']:.2e} in float32"
        + ("" if args.dtype == "float32" else f", {check['max_abs_logit_diff']:.2e} in {args.dtype}")
    )
    auto = registry.get(result.manifest.task).model_class
    print(f'load it with transformers: {auto}.from_pretrained("{result.output}")')
    if "gguf" in section:
        exported, gguf_check = section["gguf"], section["gguf"]["check"]
        print(
            f"GGUF ({exported['type']}): {result.output / exported['file']}, read back: logits within "
            f"{gguf_check['max_abs_logit_diff_relative']:.2%} of the largest, same next token at "
            f"{gguf_check['same_next_token_share']:.0%} of positions"
        )
        print(f"Ollama: cd {result.output} && ollama create {result.output.name} -f Modelfile")
    if "gguf_adapter" in section:
        print(f"GGUF LoRA: {result.output / section['gguf_adapter']['file']} (llama.cpp: --lora, on the base as GGUF)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..bench import compare

    options = commands.from_flags(commands.CompareOptions, args)
    own = {f.name for f in dataclasses.fields(options)}  # compare's `output` and `lora_r` are not the runs' settings
    shared = {f.name: getattr(args, f.name) for f in settings() if hasattr(args, f.name) and f.name not in own}
    if options.runs and (options.methods or options.lora_r):
        raise UserError("--runs names every run; leave out --methods and --lora-r")
    seeds = _listed(options.seeds, int)
    ranks = _listed(options.lora_r, int)
    found = compare.plan(args.task, _listed(options.methods, str), ranks, options.runs, args.config, shared, seeds)
    output = Path(options.output or f"adapters/compare-{args.task}")
    results = compare.compare(args.task, found, output, args.debug)
    print(compare.table(results))
    print(f"results: {output / compare.RESULTS}.md, .json and .png (the plot)")
    return 0


def _listed(value: str | None, kind: type) -> list[Any] | None:
    """A comma-separated flag's values, or None when it was not given."""
    if value is None:
        return None
    try:
        return [kind(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"{value!r}: expected a comma-separated list of {kind.__name__} values") from None


def run_adapters(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..engine import adapters

    found = adapters.list_adapters(args.folder)
    if args.json:
        print(json.dumps([asdict(listed) for listed in found], indent=2))
        return 0
    print("\n".join(report.listing(found)) if found else f"no adapters under {args.folder}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ..engine import adapters

    folder = Path(args.adapter)
    manifest = adapters.read_manifest(folder, adapter=False)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print("\n".join(report.inspection(adapters.describe_folder(folder), manifest)))
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    from ..core import catalog

    if args.action == "ls" and args.name is None:
        print("\n".join(report.recipes(catalog.shipped())))
    elif args.action == "ls" or args.dest is None:
        raise UserError("recipes: ls (or nothing) lists them, cp NAME DEST copies one out; got other arguments")
    else:
        print(f"{args.name} -> {catalog.copy(args.name, args.dest)} (edit it, then train it with --config)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    limits = commands.from_flags(commands.ServeLimits, args)
    commands.from_flags(commands.ServeOptions, args)
    api_key = commands.api_key(args.api_key)  # or $LORA_FT_API_KEY
    from ..serve import pool, server  # after the checks: a bad flag is told before torch is imported

    sock = server.bind(args.host, args.port)  # before loading: a port in use is said at once
    registry = pool.load(args.adapters, limits)
    host, port = sock.getsockname()[:2]
    print("\n".join(report.serving(registry.memory(), len(registry.adapters))), flush=True)
    if api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: {host} is reachable from other machines and --api-key is not set", file=sys.stderr)
    app = server.create_app(registry, api_key, tuple(args.allowed_host or ()))
    sock.listen(server.BACKLOG)  # from here on, connections wait for uvicorn to start rather than being refused
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {len(registry.adapters)} adapters at http://{shown}:{port}/ (API: /v1)", flush=True)
    server.run(app, sock, "warning" if args.quiet else "info", args.header_timeout, args.body_timeout)
    return 0


def run_studio(args: argparse.Namespace) -> int:
    from ..serve import server
    from ..studio import app

    commands.from_flags(commands.StudioOptions, args)
    api_key = commands.api_key(args.api_key)  # or $LORA_FT_API_KEY
    if api_key is None and args.host not in app.LOOPBACK:
        raise UserError(f"`host` {args.host} is reachable from other machines: give `api_key` to listen there")
    sock = server.bind(args.host, args.port)
    app, runs = app.create_app(args.workspace, api_key, args.parallel, int(args.max_upload_mb * (1 << 20)))
    sock.listen(server.BACKLOG)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"studio at http://{shown}:{port}/ (workspace {Path(args.workspace).resolve()})", flush=True)
    try:
        server.run(app, sock, "warning")  # the page polls: access lines would drown the rest
    finally:
        runs.close()  # live runs stop as on Ctrl-C, each with a checkpoint: a studio started again resumes them
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import inference, speed
    from ..core import files

    commands.from_flags(commands.BenchOptions, args)
    machine = speed.machine()
    where = machine.get("gpu") or machine["cpu"]
    print(f"machine: {where}, {machine['cpu_threads']} threads, torch {machine['torch']}")
    if args.serve:
        from ..bench import serving

        figures = serving.run(args.serve, args.quick)
        print(report.serve_bench(figures))
    elif args.inference:
        figures = inference.run(args.quick, args.tokenizer, args.data, args.seed)
        print(report.inference_summary(figures))
    else:
        quiet = None if args.debug else progress.quiet_libraries  # each setup runs in a fresh process, set up by this
        figures = speed.run(
            args.quick, args.tokenizer, args.data, args.seed, quiet, task=args.task, bench_model=args.model
        )
        print(report.bench_table(figures))
        if args.quick:
            print("* seconds per epoch extrapolated from the timed steps (fit of seconds against tokens per step)")
        print(report.bench_summary(figures))
    if args.json:
        files.write_json_atomically(Path(args.json), figures)
        print(f"figures: {args.json}")
    return 0


COMMANDS = {
    **{name: run_train for name in registry.NAMES},
    "predict": run_predict,
    "eval": run_eval,
    "generate": run_generate,
    "chat": run_chat,
    "merge": run_merge,
    "adapters": run_adapters,
    "inspect": run_inspect,
    "recipes": run_recipes,
    "serve": run_serve,
    "studio": run_studio,
    "compare": run_compare,
    "bench": run_bench,
}
# Commands that only read JSON or YAML: they skip importing the ML libraries (seconds of startup).
LIGHT_COMMANDS = {"adapters", "inspect", "recipes"}


def _terminated(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _how_to_resume(args: argparse.Namespace, folder: Path) -> None:
    """For a training run that stopped with checkpoints kept in `folder`: where, and the command that continues it."""
    from ..engine import runs

    output = runs.output_of(folder)
    shown = os.path.relpath(output) if output.is_relative_to(Path.cwd()) else str(output)
    print(f"checkpoints kept in {folder}", file=sys.stderr)
    overwrite = " --overwrite" if getattr(args, "overwrite", False) else ""
    launch = "python" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "<torchrun or accelerate launch, as before>"
    print(f"resume with: {launch} -m lora_ft {args.command} --resume {shown}{overwrite}", file=sys.stderr)


def _as_flags(message: str) -> str:
    """A library message names settings as `name`; on the command line they are flags (--name). Only the names of
    flags are rewritten: a value quoted in a message stays as it is."""
    commands = build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
    flags = {action.dest for sub in commands for action in sub._actions if action.option_strings}

    def shown(name: re.Match) -> str:
        return "--" + name[1].replace("_", "-") if name[1] in flags else name[0]

    return re.sub(r"`([a-z][a-z0-9_]*)`", shown, message)


def _stopped(args: argparse.Namespace, error: BaseException, kept: Path | None = None) -> int:
    """The exit code for what stopped a command, after one line to the person (from the main process, except for an
    internal error) and, for a run kept in `kept`, how to resume it. Called while `error` is handled."""
    if isinstance(error, BrokenPipeError):  # the reader went away (`| head`): not an error; stop writing to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if isinstance(error, UserError):
        if args.debug:
            traceback.print_exc()
        code, line, shown = error.code, f"error: {_as_flags(str(error))}", _main_process()
    elif isinstance(error, (Interrupted, KeyboardInterrupt)):
        interrupted = error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)
        line = f"interrupted by {interrupted.signal_name}{interrupted.where()}"
        code, shown = interrupted.code, _main_process()
    elif isinstance(error, OSError) and error.filename and error.strerror:  # a full disk, a folder not ours
        if args.debug:
            traceback.print_exc()
        code, line, shown = 2, f"error: {error.filename}: {error.strerror}", _main_process()
    elif isinstance(error, Exception):
        if args.debug:
            traceback.print_exc()
        why = f"{type(error).__name__}: {error}"
        code, line, shown = 1, f"internal error: {why} (run again with --debug for the traceback)", True
    else:
        raise error  # SystemExit and the like
    if shown:
        print(report.one_line(line), file=sys.stderr)
        if kept is not None:
            _how_to_resume(args, kept)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0 (done), 1 (internal error), 2 (bad input or usage, or a file that cannot
    be read or written), 130 or 143 (stopped by SIGINT or SIGTERM)."""
    args = build_parser().parse_args(argv)
    if not args.debug and args.command not in LIGHT_COMMANDS:
        progress.quiet_libraries()
    progress.show(quiet=args.quiet or not _main_process())
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except RunKept as kept:
        return _stopped(args, kept.error, kept.folder)
    except BaseException as e:
        return _stopped(args, e)
    finally:
        signal.signal(signal.SIGTERM, previous)
