"""`compare`: several configurations (PEFT methods, ranks, or recipes of one's own) trained on the same data, split
and seed, one after another, each a normal adapter folder made by the task's own command in a process of its own
(so that each run's peak memory is its own); then one table (Markdown and JSON) and a plot of the key metric against
trainable parameters with the Pareto front marked. Run again, it reuses the finished runs and continues an
interrupted one from its checkpoint."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core import catalog, files, plots, registry, stats
from ..core.config import load_config, read_recipe, task_defaults, validate
from ..core.errors import Interrupted, UserError
from ..core.manifest import Manifest
from ..engine import methods, runs

log = logging.getLogger("lora_ft")

RECIPES = "recipes"  # OUTPUT/recipes/<run>.yaml: what each run was asked to be (copy one to train it alone)
RESULTS = "results"  # OUTPUT/results.md, .json, .png
TAKEN = {RECIPES, *(f"{RESULTS}.{suffix}" for suffix in ("md", "json", "png"))}  # no run may be named so


@dataclass
class Run:
    name: str
    settings: dict[str, Any]  # recipe keys: the shared ones with this run's own on top
    row: dict[str, Any] = field(default_factory=dict)  # its results, once finished
    configuration: str | None = None  # with several seeds: the configuration this is one seed of (its name)


def plan(
    task: str,
    method_names: list[str] | None = None,
    ranks: list[int] | None = None,
    runs_file: str | Path | None = None,
    recipe: str | Path | None = None,
    shared: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
) -> list[Run]:
    """The runs to compare: one per entry of `runs_file` (a YAML list of recipe mappings, each with an optional
    `name`), or each of `method_names` at each of `ranks` (a method without a rank, ia3 or full, once). `recipe`
    and `shared` (flags) go under each run's own settings. With `seeds`, each of those once per seed (see
    `per_seed`). Every run's config is checked now, before any trains."""
    base = (read_recipe(catalog.find(recipe), task) if recipe else {}) | validate(_given(shared), "command line", task)
    if runs_file is not None:
        own = [(entry.pop("name", None), entry) for entry in _read_runs(catalog.find(runs_file, "runs"), task)]
    else:
        chosen = ranks or [base.get("lora_r", task_defaults(task)["lora_r"])]
        own = []
        for name in method_names or ["lora"]:
            if name not in methods.METHODS:
                raise UserError(f"`methods`: unknown method {name!r} (known: {', '.join(methods.METHODS)})")
            if methods.METHODS[name].rank:
                own += [(None, {"method": name, "lora_r": r}) for r in chosen]
            else:
                own.append((None, {"method": name}))
    found = [Run(name or _name(settings), base | settings) for name, settings in own]
    names = [run.name for run in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two runs are named {twice[0]!r}: give each entry its own `name`")
    found = per_seed(found, seeds, task) if seeds else found
    for run in found:  # a combination PEFT cannot do, refused now rather than hours in (any model will do for that)
        methods.check(load_config(task, None, run.settings | {"model": run.settings.get("model") or "gpt2"}))
    return found


def per_seed(found: list[Run], seeds: list[int], task: str) -> list[Run]:
    """Each configuration once per seed, as runs named `<name>-seed<seed>`. `seeds` is a count (one number N: the
    configuration's seed and the N - 1 after it) or the seeds themselves (two or more). The seed fixes the split,
    the initialisation and the data order, so the seeds' spread is that of all three."""
    if len(seeds) == 1 and seeds[0] < 1:
        raise UserError(f"`seeds`: a number of seeds is at least 1, got {seeds[0]}")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"`seeds`: {', '.join(map(str, seeds))} names a seed twice")
    expanded = []
    for run in found:
        first = run.settings.get("seed", task_defaults(task)["seed"])
        chosen = [first + i for i in range(seeds[0])] if len(seeds) == 1 else seeds
        for seed in chosen:
            settings = run.settings | validate({"seed": seed}, "`seeds`", task)
            expanded.append(Run(f"{run.name}-seed{seed}", settings, configuration=run.name))
    return expanded


def _given(values: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v is not None}


def _read_runs(path: Path, task: str) -> list[dict[str, Any]]:
    try:
        entries = yaml.safe_load(files.read_bytes(path, files.MAX_RECORD_BYTES, "runs file").decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: runs file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the runs file ({str(e).splitlines()[0]})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{path}: a runs file is a YAML list of recipe mappings, one per run")
    for number, entry in enumerate(entries, 1):
        where = f"{path}: run {number}"
        _check_name(entry.get("name"), where)
        if entry.pop("task", task) != task:  # checked now: the run itself would be refused only when it starts
            raise UserError(f"{where}: 'task' must be {task}, what this compares, or left out")
        validate({k: v for k, v in entry.items() if k != "name"}, where, task)
    return entries


def _check_name(name: Any, where: str) -> None:
    """A run's name is its folder under OUTPUT and a row of the table: one printable folder name that is not
    compare's own (recipes/, results.*)."""
    if name is None:
        return
    if not isinstance(name, str) or not name or not name.isprintable() or "/" in name or name.startswith("."):
        raise UserError(f"{where}: 'name' must be a folder name, got {name!r}")
    if name in TAKEN:
        raise UserError(f"{where}: 'name' {name!r} is compare's own ({', '.join(sorted(TAKEN))}): choose another")


def _name(settings: dict[str, Any]) -> str:
    method = settings.get("method", "lora")
    rank = f"-r{settings['lora_r']}" if methods.METHODS[method].rank and "lora_r" in settings else ""
    return method + rank


def compare(task: str, found: list[Run], output: str | Path, debug: bool = False) -> dict[str, Any]:
    """Train each of `found` into OUTPUT/<name> (reusing a finished one, resuming an interrupted one), then write
    OUTPUT/results.{md,json,png}; returns what results.json holds."""
    output = Path(output)
    (output / RECIPES).mkdir(parents=True, exist_ok=True)
    for number, run in enumerate(found, 1):
        folder, recipe = output / run.name, output / RECIPES / f"{run.name}.yaml"
        text = yaml.safe_dump({"task": task, **run.settings}, sort_keys=False)
        finished, resumable = (folder / files.MANIFEST_NAME).is_file(), _resumable(folder)
        if finished or resumable:  # made (or begun) from the recipe asked for now, or refused
            _check_same(folder, recipe, text)
        if finished:
            log.info("run %d/%d, %s: finished before, reused", number, len(found), run.name)
        else:
            files.write_text_atomically(recipe, text)
            log.info("run %d/%d, %s: %s", number, len(found), run.name, "resuming" if resumable else "training")
            _train(task, recipe, folder, resumable, debug)
        run.row = row(task, run.name, folder)
    results = summarise(task, found, output)
    files.write_json_atomically(output / f"{RESULTS}.json", results)
    files.write_text_atomically(output / f"{RESULTS}.md", table(results) + "\n")
    plots.plot_pareto(results, output / f"{RESULTS}.png")
    return results


def _resumable(folder: Path) -> bool:
    """An interrupted run into `folder` left a checkpoint to continue from."""
    partial = runs.partial_folder(folder)
    return partial.is_dir() and runs.newest_checkpoint(partial) is not None


def _check_same(folder: Path, recipe: Path, text: str) -> None:
    """A finished run is reused, and an interrupted one resumed, only when it was asked to be what is asked now."""
    was = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
    if was != text:
        raise UserError(
            f"{folder}: a run made from another recipe than this comparison's ({recipe} differs); "
            f"delete {folder} (and {runs.partial_folder(folder).name} beside it) to train it again, or compare "
            "into another `output`"
        )


def _train(task: str, recipe: Path, folder: Path, resume: bool, debug: bool) -> None:
    """The task's own command on `recipe` into `folder`, in a process of its own (progress shown as it goes), or
    with `resume` from the checkpoint an interrupted run into `folder` left."""
    command = [sys.executable, "-m", "lora_ft", task, "--config", str(recipe), "--output", str(folder)]
    if resume:
        command = [sys.executable, "-m", "lora_ft", task, "--resume", str(folder)]
    # In a session of its own, so that Ctrl-C reaches this process only, which passes one signal on: the run then
    # stops as its own command does on one (at the end of its step, with a checkpoint), not at once on a second.
    child = subprocess.Popen(
        [*command, *(["--debug"] if debug else [])], stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        code = child.wait()
    except BaseException as stop:
        child.send_signal(signal.SIGTERM if getattr(stop, "signal_name", "") == "SIGTERM" else signal.SIGINT)
        child.wait()
        log.info("comparison stopped in run %s: the same `compare` command continues it", folder.name)
        raise
    if code in (130, 143):  # stopped by a signal sent to it alone: stop the comparison too
        log.info("comparison stopped in run %s: the same `compare` command continues it", folder.name)
        raise Interrupted(code - 128)
    if code != 0:
        raise UserError(f"run {folder.name} failed (exit {code}; its error is above): fix it and run again")


def row(task: str, name: str, folder: Path) -> dict[str, Any]:
    """One run's line of the table, from its manifest and its files."""
    manifest = Manifest.read(folder)
    key = registry.get(task).key_metric
    val = manifest.metrics.get("val", {})
    training, lora = manifest.training, manifest.lora
    weights = [f for f in ("adapter_model.safetensors", "model.safetensors") if (folder / f).is_file()]
    epochs = training.get("epochs") or 0
    return {
        "name": name,
        "folder": str(folder),
        "method": lora.get("method", "lora"),
        "lora_r": manifest.config.get("lora_r") if methods.of(manifest.config).rank else None,
        f"val_{key}" if key in val else "val_loss": val.get(key, val.get("loss")),
        f"test_{key}": manifest.metrics.get("test", {}).get(key),
        "trainable_parameters": lora["trainable_parameters"],
        "weights_bytes": sum((folder / f).stat().st_size for f in weights),
        "seconds_per_epoch": round(training["seconds"] / epochs, 3) if epochs else None,
        "peak_rss_bytes": training.get("peak_rss_bytes"),
        "peak_gpu_bytes": training.get("peak_gpu_bytes"),
    }


def summarise(task: str, found: list[Run], output: Path) -> dict[str, Any]:
    """results.json: a row per run and the Pareto front; with several seeds, a row per configuration (each figure's
    mean over its seeds, with `_std` and `_ci95` beside the val and test metric's) and the seeds' own rows in
    `per_seed`."""
    key = f"test_{registry.get(task).key_metric}"
    rows = [run.row for run in found]
    results = {"task": task, "key_metric": key, "output": str(output)}
    if not any(run.configuration for run in found):
        return results | {"runs": rows, "pareto": pareto(rows, key)}
    for run in found:
        run.row.update(configuration=run.configuration, seed=run.settings["seed"])
    names = list(dict.fromkeys(run.configuration for run in found))
    configurations = [_over_seeds([r for r in rows if r["configuration"] == name]) for name in names]
    interval = f"{stats.LEVEL:.0%} t-interval of the mean over seeds (Student's t, n - 1 degrees of freedom)"
    return results | {
        "interval": interval,
        "runs": configurations,
        "per_seed": rows,
        "pareto": pareto(configurations, key),
    }


def _over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's row from its seeds' rows: the metrics' mean, standard deviation and t-interval; the
    parameters and weights (the same for every seed) as they are; time and memory as means."""
    first = rows[0]
    row = {"name": first["configuration"], "method": first["method"], "lora_r": first["lora_r"]}
    row |= {"seeds": [r["seed"] for r in rows], "folders": [r["folder"] for r in rows]}
    for metric in (k for k in first if k.startswith(("val_", "test_"))):
        figures = stats.over_seeds([r.get(metric) for r in rows])
        row |= {metric: figures["mean"], f"{metric}_std": figures["std"], f"{metric}_ci95": figures["ci95"]}
    row |= {"trainable_parameters": first["trainable_parameters"], "weights_bytes": first["weights_bytes"]}
    for figure in ("seconds_per_epoch", "peak_rss_bytes", "peak_gpu_bytes"):
        row[figure] = stats.over_seeds([r.get(figure) for r in rows])["mean"]
    return row


def pareto(rows: list[dict[str, Any]], key: str) -> list[str]:
    """The runs no other run beats: as good or better on `key` with no more trainable parameters, and strictly
    better on one of the two. Where the rows carry 95% intervals (`<key>_ci95`: several seeds), a run is beaten only
    where its interval lies wholly below the interval of a run with no more trainable parameters: a difference
    within the seeds' noise does not take a run off the front. Sorted by trainable parameters."""
    scored = [r for r in rows if r.get(key) is not None]

    def bounds(r: dict[str, Any]) -> tuple[float, float]:
        interval = r.get(f"{key}_ci95")
        return (interval[0], interval[1]) if interval else (r[key], r[key])

    def beats(o: dict[str, Any], r: dict[str, Any]) -> bool:
        if f"{key}_ci95" in r:
            return o is not r and o["trainable_parameters"] <= r["trainable_parameters"] and bounds(r)[1] < bounds(o)[0]
        return (
            o[key] >= r[key]
            and o["trainable_parameters"] <= r["trainable_parameters"]
            and (o[key] > r[key] or o["trainable_parameters"] < r["trainable_parameters"])
        )

    return [
        r["name"]
        for r in sorted(scored, key=lambda r: r["trainable_parameters"])
        if not any(beats(o, r) for o in scored)
    ]


def table(results: dict[str, Any]) -> str:
    """results.md: one row per run (with several seeds: per configuration, its metrics as mean ± std and 95%
    interval over the seeds, then a table of every seed's run), Pareto-front runs marked."""
    if "per_seed" not in results:
        return _table(results["runs"], results["key_metric"], results["pareto"])
    lines = [_table(results["runs"], results["key_metric"], results["pareto"], seeds=True), ""]
    lines += [
        f"Mean ± standard deviation over the seeds; 95% CI: the {results['interval']}.",
        "",
        "Each seed's run:",
        "",
    ]
    return "\n".join([*lines, _table(results["per_seed"], results["key_metric"], None)])


def _table(rows: list[dict[str, Any]], key: str, front: list[str] | None, seeds: bool = False) -> str:
    from ..core.report import interval, size

    val_key = next((k for k in rows[0] if k.startswith("val_") and not k.endswith(("_std", "_ci95"))), "val")
    metrics = [f"{val_key} mean ± std", f"{val_key} 95% CI", f"{key} mean ± std", f"{key} 95% CI"]
    metrics = metrics if seeds else [val_key, key]
    head = ["run", "method", "r", *(["seeds"] if seeds else []), *metrics, "trainable params", "weights"]
    head += ["s / epoch", "peak RSS", *(["Pareto"] if front is not None else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        figures = [_number(r.get(val_key)), _number(r.get(key))]
        if seeds:  # each metric as mean ± std, then its interval
            spread = [
                (f"{_number(r.get(k))} ± {_number(r.get(f'{k}_std'))}", interval(r.get(f"{k}_ci95")))
                for k in (val_key, key)
            ]
            figures = [cell for pair in spread for cell in pair]
        cells = [r["name"], r["method"], r["lora_r"] if r["lora_r"] is not None else "-"]
        cells += [len(r["seeds"])] if seeds else []
        cells += [*figures, f"{r['trainable_parameters']:,}", size(r["weights_bytes"])]
        cells.append(f"{r['seconds_per_epoch']:.1f}" if r["seconds_per_epoch"] is not None else "-")
        cells.append(size(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-")
        cells += ["yes" if r["name"] in front else ""] if front is not None else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
