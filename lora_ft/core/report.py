"""Tables and text for people: the CLI prints what these return. Nothing here reads files or runs models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import Recipe


@dataclass
class Listed:
    """One row of `adapters`: an adapter or merged export folder, described by its manifest (built by
    `adapters.list_adapters`, shown by `listing`)."""

    path: str
    kind: str  # "adapter" | "merged" | "?" (manifest unreadable) | "interrupted" | "running" (a training run)
    task: str | None = None
    method: str | None = None  # lora, dora, ia3, vera, full (config.METHODS)
    base: str | None = None
    created: str | None = None
    metric: str | None = None
    value: float | None = None
    interval: list[float] | None = None  # the test metric's 95% interval (its `_ci95` in the manifest), if recorded
    size_bytes: int = 0
    problem: str | None = None
    state: str | None = None  # a training run's: "PID N" when running, else the step it can resume from, if any


ONE_LINE_LIMIT = 1000  # characters of an error line; a value pasted 100 KB long is cut in its middle


def shown(text: str) -> str:
    """`text` safe on a terminal line: a character that is not printable (a newline that would forge a table row,
    the ESC of an ANSI or OSC sequence that the terminal would obey) is written as its Python escape, `\\n`, `\\x1b`."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """An error as one line of at most about `limit` characters: escaped as `shown` does, and, if longer, cut in the
    middle, keeping its start (what failed) and its end (what to do), with how much was cut."""
    line = shown(text)
    if len(line) <= limit:
        return line
    head, tail = line[: limit - limit // 5], line[-(limit // 5) :]
    return f"{head} [... {len(line) - len(head) - len(tail)} characters cut ...] {tail}"


METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "loss")


def metrics_table(metrics: dict[str, dict[str, Any]], columns: tuple[str, ...] = METRIC_COLUMNS) -> str:
    """One row per split; a metric that has a 95% interval (`<metric>_ci95`) is followed by it, in a column of its
    own."""
    shown = [(c, any(f"{c}_ci95" in values for values in metrics.values())) for c in columns]
    lines = ["split  " + "".join(f"{c:>11}" + (f"{c + ' 95% CI':>21}" if ci else "") for c, ci in shown) + "   n"]
    for split, values in metrics.items():
        row = "".join(
            f"{values[c]:>11.4f}" + (f"{interval(values.get(f'{c}_ci95')):>21}" if ci else "") for c, ci in shown
        )
        lines.append(f"{split:<7}{row}   {values['examples']}")
    return "\n".join(lines)


def interval(value: Any) -> str:
    """A 95% interval as `[low, high]`, or "-" where there is none (one example, an old manifest)."""
    return f"[{value[0]:.4f}, {value[1]:.4f}]" if isinstance(value, list) and len(value) == 2 else "-"


def trained(training: dict[str, Any]) -> str:
    """How a run trained: steps, time, precision, the share of real (not padding) tokens, processes, and the step
    it kept (the best by its val metric: the manifest's `best_val_<metric>`)."""
    share = training["tokens"]["real_share"]
    processes = f", {training['world_size']} processes" if training["world_size"] > 1 else ""
    tokens = f", {share:.0%} of tokens real" if share else ""
    how = f"{training['precision']}{tokens}{processes}"
    line = f"trained {training['steps']} steps in {training['seconds']:.1f} s ({how})"
    for key, value in training.items():
        if key.startswith("best_val_") and value is not None:
            line += f"; best val {key.removeprefix('best_val_')} {value:.4f} at step {training['best_step']}"
    return line


def instruct_table(metrics: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'test, n=' + str(metrics['test']['examples']):<16}{'loss':>9}{'perplexity':>12}{'ROUGE-L':>9}"
        f"{'ROUGE-L 95% CI':>18}{'EOS':>7}"
    ]
    for key, name in (("test_base", "untuned base"), ("test", "tuned")):
        m = metrics[key]
        figures = f"{m['loss']:>9.4f}{m['perplexity']:>12.2f}{m['rouge_l']:>9.4f}{interval(m.get('rouge_l_ci95')):>18}"
        lines.append(f"{name:<16}{figures}{m['eos_share']:>7.0%}")
    return "\n".join(lines)


def prefer_table(metrics: dict[str, dict[str, Any]]) -> str:
    """What DPO changed on the test pairs: the starting point against the tuned adapter."""
    start, tuned = metrics["test_start"], metrics["test"]
    rows = [
        ("DPO loss", "loss", ".4f"),
        ("reward accuracy", "reward_accuracy", ".1%"),
        ("reward margin", "reward_margin", ".4f"),
        ("ROUGE-L vs chosen", "rouge_l_chosen", ".4f"),
        ("ROUGE-L vs rejected", "rouge_l_rejected", ".4f"),
        ("ROUGE-L gap", "rouge_l_gap", "+.4f"),
        ("EOS share", "eos_share", ".0%"),
        ("mean new tokens", "mean_new_tokens", ".1f"),
    ]
    lines = [f"{'test, ' + str(tuned['examples']) + ' answered':<22}{'start':>10}{'tuned':>10}"]
    lines += [f"{name:<22}{format(start[key], how):>10}{format(tuned[key], how):>10}" for name, key, how in rows]
    gaps = (interval(start.get("rouge_l_gap_ci95")), interval(tuned.get("rouge_l_gap_ci95")))
    lines.append(f"ROUGE-L gap 95% CI: start {gaps[0]}, tuned {gaps[1]}")
    return "\n".join(lines)


def size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def readable(value: Any, indent: int = 0) -> list[str]:
    """A manifest as indented `key: value` lines; short lists inline, floats to 4 significant digits."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if key == "log_history":
            lines.append(f"{pad}{key}: {len(item)} entries (see --json)")
        elif isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            lines += readable(item, indent + 1)
        else:
            lines.append(f"{pad}{key}: {scalar(item)}")
    return lines


def scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(scalar, value)) + "]"
    return "-" if value is None or value == {} else str(value)


def bench_table(report: dict[str, Any]) -> str:
    columns = ("s/epoch", "real tok/s", "GFLOP/s", "MFU", "peak RSS", "steps timed")
    lines = [f"{'setup':<13}" + "".join(f"{c:>13}" for c in columns) + "  what"]
    for name, r in report["setups"].items():
        timed = f"{r['steps_timed']}{'' if r['epoch_measured_whole'] else '*'}"
        values = (
            f"{r['seconds_per_epoch']:.1f}",
            f"{r['real_tokens_per_second']:.0f}",
            f"{r['gflops_per_second']:.1f}",
            f"{r['mfu']:.0%}" if r.get("mfu") is not None else "-",
            size(r["peak_rss_bytes"]),
            timed,
        )
        row = "".join(f"{v:>13}" for v in values)
        lines.append(f"{name:<13}{row}  {r['description']} ({r['precision_run']})")
    return "\n".join(lines)


def bench_summary(report: dict[str, Any]) -> str:
    """The benchmark's ratios in one paragraph: speedups, utilisation against the machine's own peak, memory."""
    peaks = report["machine"]["matmul_peak_gflops_per_second"]
    course, precision = report["speedup_vs_course"], report["setups"]["lora_ft"]["precision_run"]
    memory, time = report["checkpointing_memory_ratio"], report["checkpointing_time_ratio"]
    lines = [
        f"matmul peak here: {', '.join(f'{name} {value:.0f} GFLOP/s' for name, value in peaks.items())}",
        f"{report.get('task', 'spam')}: speedup vs naive: {report['speedup_vs_naive']:.2f}x; vs the course's code: "
        + (f"{course:.2f}x" if course is not None else f"not measured ({report['course_missing']})"),
        f"lora_ft's model-FLOP utilisation: {report['mfu']:.0%} of the {precision} peak",
        f"peak RSS LoRA / full fine-tuning: {report['peak_rss_ratio_lora_vs_full']:.2f}; with activation "
        f"checkpointing: memory x{memory:.2f}, time x{time:.2f}",
        f"--compile: epochs x{report['compile_speedup']:.2f} as fast, after "
        f"{report['setups']['lora_compile']['warmup_seconds']:.0f} s of warm-up steps (the compile)",
    ]
    return "\n".join(lines)


def inference_summary(report: dict[str, Any]) -> str:
    """`bench --inference` in four lines: lora_ft's predict and generate against the naive loop."""
    p, g = report["predict"], report["generate"]
    return "\n".join(
        [
            f"predict:  {p['texts_per_second']:.1f} texts/s (batches of {p['batch_size']}) vs "
            f"{p['naive_texts_per_second']:.1f} one at a time: x{p['speedup']:.2f}",
            f"          same labels for {p['same_labels']:.0%} of {p['texts']} messages",
            f"generate: {g['tokens_per_second']:.1f} tokens/s (one batch of {g['prompts']}, KV cache) vs "
            f"{g['naive_tokens_per_second']:.1f} one at a time without the cache: x{g['speedup']:.2f}",
            f"          same answers for {g['same_answers']:.0%} of {g['prompts']} prompts",
        ]
    )


def listing(found: list[Listed]) -> list[str]:
    """`adapters`: a table of the folders found, then a line for each unreadable or interrupted one."""
    rows = [("path", "kind", "task", "method", "base", "created (UTC)", "test metric", "95% CI", "size")]
    for listed in found:  # created: when an interrupted run started
        metric = f"{listed.metric} {listed.value:.4f}" if listed.value is not None else "-"
        created = (listed.created or "-").replace("T", " ")[:16]
        base, task, method = listed.base or "?", listed.task or "?", listed.method or "-"
        cells = (metric, interval(listed.interval), size(listed.size_bytes))
        rows.append(tuple(map(shown, (listed.path, listed.kind, task, method, base, created, *cells))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    notes = []
    for listed in found:
        if listed.problem:
            notes.append(f"unreadable: {listed.problem}")
        elif listed.kind == "running":
            notes.append(f"running: {listed.path} ({listed.state})")
        elif listed.kind == "interrupted":
            resume = f"python -m lora_ft {listed.task} --resume {listed.path}"
            where = f"can continue from {listed.state}" if listed.state else "stopped before its first checkpoint"
            notes.append(f"interrupted: {listed.path} {where}; {'resume' if listed.state else 'start again'}: {resume}")
    return lines + [shown(note) for note in notes]


def recipes(found: list[Recipe]) -> list[str]:
    """`recipes`: a table of the shipped recipes (name, task, description), then how to use one."""
    rows = [("name", "task", "description"), *((shown(r.name), shown(r.task), shown(r.description)) for r in found)]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{name.ljust(widths[0])}  {task.ljust(widths[1])}  {text}".rstrip() for name, task, text in rows]
    return [*lines, "train one: python -m lora_ft TASK --config NAME; edit one: python -m lora_ft recipes cp NAME DEST"]


def inspection(listed: Listed, manifest: dict[str, Any]) -> list[str]:
    """`inspect`: what the folder is, its key metric, its manifest readably, its files with their sizes."""
    folder = Path(listed.path)
    kind = {"merged": "merged export", "full model": "fully fine-tuned model"}.get(listed.kind, "adapter")
    method = f" ({listed.method})" if listed.method and listed.kind == "adapter" else ""
    lines = [f"{folder}: {manifest.get('task')} {kind}{method}, {size(listed.size_bytes)}"]
    if listed.value is not None:
        lines.append(f"test {listed.metric}: {listed.value:.4f}")
    lines += [*readable(manifest), "files:"]
    lines += [f"  {f.name}  {size(f.stat().st_size)}" for f in sorted(folder.iterdir()) if f.is_file()]
    return [shown(line) for line in lines]  # a manifest edited by hand, a file named by anyone


def serving(memory: dict[str, Any], count: int) -> list[str]:
    """What `serve` holds in memory (serve.Registry.memory): each base once, with its adapters' own weights."""
    lines = []
    for base in memory["bases"]:
        own = ", ".join(f"{name} {size(n)}" for name, n in base["adapters"].items())
        shared = f"shared by {len(base['adapters'])} adapters" if len(base["adapters"]) > 1 else "1 adapter"
        lines.append(f"base {base['base']} ({base['model_class']}): {size(base['weight_bytes'])}, {shared}: {own}")
    bases = len(memory["bases"])
    lines.append(
        f"weights: {size(memory['weight_bytes'])} for {count} adapters on {bases} base{'s' * (bases > 1)}; "
        f"process memory (RSS) {size(memory['rss_bytes'])}"
    )
    return lines


def serve_bench(figures: dict[str, Any]) -> str:
    """`bench --serve`'s table: requests per second and latency of each adapter, batched against one at a time."""
    lines = [f"{'adapter':<28}{'way':<15}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}   speedup, same answers"]
    for name, row in figures["adapters"].items():
        for way in ("batched", "one_at_a_time"):
            m = row[way]
            tail = f"   {row['speedup']:.2f}x, {row['same_answers']:.0%}" if way == "batched" else ""
            shown = name if way == "batched" else ""
            lines.append(
                f"{shown[:27]:<28}{way.replace('_', ' '):<15}{m['requests_per_second']:>8.1f}"
                f"{m['p50_ms']:>9.0f}{m['p99_ms']:>9.0f}{tail}"
            )
    what = f"{figures['clients']} concurrent clients, {next(iter(figures['adapters'].values()))['requests']} requests"
    return "\n".join([*lines, f"({what} per adapter and way; generation greedy)"])


def paired(result: dict[str, Any]) -> list[str]:
    """`eval A B`: both adapters' figures on the same test examples, A - B, and each paired test's verdict."""
    a, b = result["a"]["adapter"], result["b"]["adapter"]
    lines = [f"A: {a}", f"B: {b}", f"both on the same test split, {result['examples']} examples"]
    lines.append(
        f"{'metric':<10}{'A':>9}{'B':>9}{'A - B':>9}{'95% CI of A - B':>21}{'p-value':>9}  {'verdict':<14}test"
    )
    for name, m in result["metrics"].items():
        counts = (
            f" ({m['only_a_right']} right by A alone, {m['only_b_right']} by B alone)" if "only_a_right" in m else ""
        )
        figures = f"{m['a']:>9.4f}{m['b']:>9.4f}{m['difference']:>+9.4f}{interval(m.get('difference_ci95')):>21}"
        lines.append(f"{name:<10}{figures}{m['p_value']:>9.4f}  {m['verdict']:<14}{m['test']}{counts}")
    return [*lines, f"beyond noise: p < {result['alpha']} (two-sided)"]
