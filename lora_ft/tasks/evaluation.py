"""`eval`: an adapter's test split rebuilt from its manifest and scored again, for either task (each task scores its
own examples: `score_test`); and two adapters scored on the same test split, each metric's difference with a
paired test of whether it is beyond noise (the tests each task names in `PAIRED`, run by `stats`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core import stats
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..engine import adapters
from . import task_code
from .task_api import Evaluation as Evaluation  # its home is task_api; `evaluation.Evaluation` as before
from .task_api import rescore


def evaluate(adapter: str | Path, force: bool = False) -> Evaluation:
    """Rebuild the adapter's test split from its manifest (the same data file, byte for byte, and the same split
    sizes, or refused) and score the adapter on it with its task's own metrics."""
    manifest = adapters.read_manifest(adapter)
    return rescore(adapter, manifest, task_code.get(manifest.task, f"{adapter}: manifest 'task'"), force)


def matches_manifest(evaluation: Evaluation) -> bool:
    """Whether the recomputed test metrics are the ones the manifest recorded: every figure both have, floats up to
    float32's last digits (the model computes in float32; a sum taken in another order, or a PiSSA adapter scored
    before its conversion to plain LoRA, differs there), the rest exactly."""
    recorded = evaluation.manifest.metrics["test"]
    return all(_same(value, recorded[key]) for key, value in evaluation.metrics.items() if key in recorded)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# What fixes a test split, as the manifest records it: two adapters are compared only where all of these agree.
TEST_SPLIT = ("sha256", "seed", "fractions", "split_sizes")


def check_same_test_split(a: Manifest, b: Manifest, names: tuple[str, str]) -> None:
    """Refuse, in one line, two adapters whose test examples differ (another task, data file, seed, split, or number
    of test examples scored)."""
    if a.task != b.task:
        raise UserError(f"{names[0]} ({a.task}) and {names[1]} ({b.task}) are adapters of two tasks: no comparison")
    for key in TEST_SPLIT:
        if a.data.get(key) != b.data.get(key):
            raise UserError(
                f"{names[0]} and {names[1]} were not tested on the same split: data {key} "
                f"{_short(a.data.get(key))} vs {_short(b.data.get(key))}"
            )
    scored = [m.metrics.get("test", {}).get("examples") for m in (a, b)]
    if scored[0] != scored[1]:
        raise UserError(f"{names[0]} and {names[1]} were scored on {scored[0]} and {scored[1]} test examples")


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else str(value)


def compare_pair(adapter_a: str | Path, adapter_b: str | Path, force: bool = False) -> dict[str, Any]:
    """Both adapters scored on their (one) test split, and for each metric the task pairs (`PAIRED`): both values,
    A - B, the paired test's p-value and verdict. The split is checked from the manifests before anything loads."""
    names = (str(adapter_a), str(adapter_b))
    manifests = [adapters.read_manifest(a) for a in names]
    check_same_test_split(*manifests, names)
    a, b = evaluate(adapter_a, force), evaluate(adapter_b, force)
    paired = task_code.get(manifests[0].task).PAIRED
    metrics = {name: _paired(name, test, columns, a, b) for name, (test, columns) in paired.items()}
    return {
        "task": manifests[0].task,
        "examples": a.metrics["examples"],
        "a": {"adapter": names[0], "test": a.metrics},
        "b": {"adapter": names[1], "test": b.metrics},
        "metrics": metrics,
        "alpha": stats.ALPHA,
    }


def _paired(name: str, test: str, columns: tuple[str, ...], a: Evaluation, b: Evaluation) -> dict[str, Any]:
    """One metric's comparison: McNemar on per-example right/wrong, or a paired bootstrap of the mean (or ratio of
    sums) of per-example columns."""
    mine, theirs = tuple(a.scores[c] for c in columns), tuple(b.scores[c] for c in columns)
    if test == "mcnemar":
        result = stats.mcnemar(*mine, *theirs)
    else:
        result = stats.paired_bootstrap(mine, theirs, stats.mean if test == "mean" else stats.ratio_of_sums)
    figures = {"a": a.metrics[name], "b": b.metrics[name], "difference": a.metrics[name] - b.metrics[name]}
    return figures | result | {"verdict": stats.verdict(result["p_value"])}
