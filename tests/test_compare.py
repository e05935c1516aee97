"""`compare`: two tiny configurations trained through the CLI, the table, JSON and plot written, and a second run
reusing the finished runs; the Pareto front; bad runs files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_ft.bench import compare
from lora_ft.core.errors import UserError

from .conftest import run_cli
from .test_methods import write_spam


def test_compare_writes_table_json_plot_and_reuses_finished_runs(tiny_gpt2: Path, tmp_path: Path):
    data, output = write_spam(tmp_path / "sms.tsv"), tmp_path / "cmp"
    args = ["compare", "spam", "--methods", "lora,ia3", "--lora-r", "2", "--model", str(tiny_gpt2)]
    args += ["--data", str(data), "--max-steps", "2", "--output", str(output)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "run 1/2, lora-r2: training" in first.stderr and "run 2/2, ia3: training" in first.stderr
    results = json.loads((output / "results.json").read_text())
    rows = {row["name"]: row for row in results["runs"]}
    assert set(rows) == {"lora-r2", "ia3"} and results["key_metric"] == "test_accuracy"
    assert rows["ia3"]["trainable_parameters"] < rows["lora-r2"]["trainable_parameters"]
    for row in rows.values():
        manifest = json.loads((Path(row["folder"]) / "lora_ft.json").read_text())  # each run a normal adapter
        assert row["test_accuracy"] == manifest["metrics"]["test"]["accuracy"]
        assert row["peak_rss_bytes"] > 0 and row["weights_bytes"] > 0 and row["seconds_per_epoch"] is not None
        assert manifest["config"]["seed"] == 123 and manifest["data"]["split_sizes"] == {
            "train": 28,
            "val": 4,
            "test": 8,
        }
    data_seen = {json.loads((Path(r["folder"]) / "lora_ft.json").read_text())["data"]["sha256"] for r in rows.values()}
    assert len(data_seen) == 1  # the same data for every run
    table = (output / "results.md").read_text()
    assert table.splitlines()[0].startswith("| run | method | r |") and "| ia3 | ia3 | - |" in table
    assert first.stdout.startswith(table.strip().splitlines()[0])
    assert Image.open(output / "results.png").size[0] > 300
    stamp = (output / "ia3" / "adapter_model.safetensors").stat().st_mtime_ns

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "lora-r2: finished before, reused" in again.stderr and "training" not in again.stderr
    assert (output / "ia3" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((output / "results.json").read_text())["runs"] == results["runs"]

    shared = {"model": str(tiny_gpt2), "data": str(data), "max_steps": 2, "lr": 0.1}
    with pytest.raises(UserError, match="a run made from another recipe"):  # refused before any training
        compare.compare("spam", compare.plan("spam", ["lora", "ia3"], [2], shared=shared), output)


def test_pareto_front():
    rows = [
        {"name": "a", "trainable_parameters": 10, "m": 0.90},
        {"name": "b", "trainable_parameters": 100, "m": 0.95},
        {"name": "c", "trainable_parameters": 100, "m": 0.93},  # beaten by b
        {"name": "d", "trainable_parameters": 1000, "m": 0.95},  # beaten by b (same metric, more parameters)
        {"name": "e", "trainable_parameters": 5000, "m": 0.99},
        {"name": "f", "trainable_parameters": 50, "m": None},  # failed to score: not on the front
    ]
    assert compare.pareto(rows, "m") == ["a", "b", "e"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: lora\n", "a YAML list of recipe mappings"),
        ("- {method: lora}\n- {method: sgd}\n", "run 2: 'method' must be one of"),
        ("- {name: ../x, method: lora}\n", "run 1: 'name' must be a folder name"),
        ('- {method: lora}\n- {name: "a\\nb", method: lora}\n', "run 2: 'name' must be a folder name"),
        ("- {name: recipes, method: lora}\n", "run 1: 'name' 'recipes' is compare's own"),
        ("- {name: results.md, method: lora}\n", "run 1: 'name' 'results.md' is compare's own"),
        ("- {method: lora}\n- {method: ia3, task: instruct}\n", "run 2: 'task' must be spam"),
        ("- {method: lora}\n- {method: lora}\n", "two runs are named 'lora'"),
        ("- {method: full, quantize: 4bit}\n", "`method` full cannot train a quantised base"),
        ("- {lora_r: [4, 16]}\n", "run 1: 'lora_r' must be int"),
    ],
)
def test_bad_runs_files_are_refused(tmp_path: Path, text: str, message: str):
    runs = tmp_path / "runs.yaml"
    runs.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        compare.plan("spam", runs_file=runs)


def test_compare_seeds_writes_mean_std_interval_and_per_seed_rows(tiny_gpt2: Path, tmp_path: Path):
    from lora_ft.core import stats

    data, output = write_spam(tmp_path / "sms.tsv"), tmp_path / "cmp"
    args = ["compare", "spam", "--methods", "lora,ia3", "--lora-r", "2", "--seeds", "2", "--model", str(tiny_gpt2)]
    args += ["--data", str(data), "--max-steps", "2", "--precision", "fp32", "--output", str(output)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "run 1/4, lora-r2-seed123: training" in first.stderr and "run 4/4, ia3-seed124: training" in first.stderr
    results = json.loads((output / "results.json").read_text())
    assert len(results["per_seed"]) == 4 and "t-interval" in results["interval"]
    for row in results["per_seed"]:  # each seed a normal adapter folder, trained with its seed
        manifest = json.loads((Path(row["folder"]) / "lora_ft.json").read_text())
        assert manifest["config"]["seed"] == row["seed"] and row["name"] == f"{row['configuration']}-seed{row['seed']}"
        assert row["test_accuracy"] == manifest["metrics"]["test"]["accuracy"]
    configurations = {row["name"]: row for row in results["runs"]}
    assert set(configurations) == {"lora-r2", "ia3"}
    for name, row in configurations.items():
        seeds = [r for r in results["per_seed"] if r["configuration"] == name]
        assert row["seeds"] == [123, 124] == [r["seed"] for r in seeds]
        for key in ("val_accuracy", "test_accuracy"):
            figures = stats.over_seeds([r[key] for r in seeds])
            assert row[key] == pytest.approx(np.mean([r[key] for r in seeds]))
            assert row[f"{key}_std"] == pytest.approx(np.std([r[key] for r in seeds], ddof=1))
            assert row[f"{key}_ci95"] == pytest.approx(figures["ci95"])
        assert row["trainable_parameters"] == seeds[0]["trainable_parameters"]
    assert results["pareto"] == compare.pareto(results["runs"], "test_accuracy")
    table = (output / "results.md").read_text()
    head = table.splitlines()[0]
    assert head.startswith(
        "| run | method | r | seeds | val_accuracy mean ± std | val_accuracy 95% CI | test_accuracy mean"
    )
    ia3 = configurations["ia3"]
    assert f"| ia3 | ia3 | - | 2 | {ia3['val_accuracy']:.4f} ± {ia3['val_accuracy_std']:.4f} |" in table
    assert "Each seed's run:" in table and "| ia3-seed124 | ia3 | - |" in table
    assert Image.open(output / "results.png").size[0] > 300

    again = run_cli(*args)  # resumable as without seeds: every seed's run reused
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished before, reused") == 4


def test_seeds_planned_as_a_count_or_a_list():
    names = [run.name for run in compare.plan("spam", ["lora"], [2], seeds=[3])]
    assert names == ["lora-r2-seed123", "lora-r2-seed124", "lora-r2-seed125"]
    chosen = compare.plan("spam", ["ia3"], seeds=[1, 7], shared={"seed": 5})
    assert [(run.name, run.settings["seed"]) for run in chosen] == [("ia3-seed1", 1), ("ia3-seed7", 7)]
    with pytest.raises(UserError, match="names a seed twice"):
        compare.plan("spam", ["ia3"], seeds=[1, 1])
    with pytest.raises(UserError, match="at least 1"):
        compare.plan("spam", ["ia3"], seeds=[0])
