"""Intervals where metrics are shown (the summary, `eval`, the manifest, the listing) and `eval A B`: two adapters on
the same test split, compared with paired tests; adapters tested on different splits refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lora_ft import cli
from lora_ft.core import stats
from lora_ft.core.config import load_config
from lora_ft.tasks import classify, instruct

from .conftest import write_examples


def _spam(tiny_gpt2: Path, folder: Path, **overrides) -> Path:
    settings = {"model": str(tiny_gpt2), "output": str(folder), "precision": "fp32"} | overrides
    return classify.train(load_config("spam", overrides=settings)).adapter_dir


@pytest.fixture(scope="module")
def spam_adapters(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three classifiers on the real SMS split: two of seed 123 (trained for 4 and 16 steps), one of seed 7."""
    root = tmp_path_factory.mktemp("eval")
    return {
        "short": _spam(tiny_gpt2, root / "short", max_steps=4),
        "long": _spam(tiny_gpt2, root / "long", max_steps=16),
        "other_seed": _spam(tiny_gpt2, root / "seed7", max_steps=2, seed=7),
    }


@pytest.fixture(scope="module")
def instruct_adapter(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval-instruct")
    overrides = {
        "model": str(tiny_gpt2),
        "data": str(write_examples(folder / "four.json")),
        "output": str(folder / "adapter"),
        "max_steps": 4,
        "batch_size": 4,
        "max_new_tokens": 8,
        "max_length": 256,
        "precision": "fp32",
    }
    return instruct.train(load_config("instruct", overrides=overrides)).adapter_dir


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "lora_ft.json").read_text())


def test_manifest_summary_and_listing_carry_intervals(spam_adapters, capsys):
    folder = spam_adapters["long"]
    manifest = _manifest(folder)
    for split in ("train", "val", "test"):
        m = manifest["metrics"][split]
        right = np.trace(np.array(m["confusion_matrix"]))
        assert m["accuracy_ci95"] == pytest.approx(stats.wilson(right, m["examples"]))
        assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
        assert m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]
    summary = classify.summary(classify.adapters.read_manifest(folder), folder)[0].splitlines()
    assert "accuracy 95% CI" in summary[0] and "f1 95% CI" in summary[0]
    low, high = manifest["metrics"]["test"]["accuracy_ci95"]
    assert f"[{low:.4f}, {high:.4f}]" in next(line for line in summary if line.startswith("test"))

    assert cli.main(["adapters", str(folder.parent), "--json"]) == 0
    listed = {Path(row["path"]).name: row for row in json.loads(capsys.readouterr().out)}
    assert listed["long"]["interval"] == manifest["metrics"]["test"]["accuracy_ci95"]
    assert cli.main(["adapters", str(folder.parent)]) == 0
    assert "95% CI" in capsys.readouterr().out.splitlines()[0]


def test_eval_shows_the_intervals_it_recomputes(spam_adapters, capsys):
    folder = spam_adapters["long"]
    assert cli.main(["eval", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches_manifest"] is True
    assert report["test"]["f1_ci95"] == _manifest(folder)["metrics"]["test"]["f1_ci95"]  # a fixed seed
    assert cli.main(["eval", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "accuracy 95% CI" in out[0] and out[-1] == "matches the manifest"


def test_eval_pair_matches_predictions(spam_adapters, capsys):
    a, b = spam_adapters["short"], spam_adapters["long"]
    assert cli.main(["eval", str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 300 and set(result["metrics"]) == {"accuracy", "loss"}
    accuracy = result["metrics"]["accuracy"]
    for side, folder in (("a", a), ("b", b)):
        assert result[side]["test"]["accuracy"] == _manifest(folder)["metrics"]["test"]["accuracy"]
    assert accuracy["difference"] == pytest.approx(accuracy["a"] - accuracy["b"])

    # McNemar's counts from the two adapters' own labels of the test messages, counted here
    manifest = classify.adapters.read_manifest(a)
    test = classify.load_splits(manifest.run_config, manifest.fractions)[1]["test"]
    truth = [test.features["label"].names[i] for i in test["label"]]
    right_a = [p.label == t for p, t in zip(classify.predict(a, test["text"]), truth, strict=True)]
    right_b = [p.label == t for p, t in zip(classify.predict(b, test["text"]), truth, strict=True)]
    only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    assert (accuracy["only_a_right"], accuracy["only_b_right"]) == (only_a, only_b)
    expected = scipy_stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    assert accuracy["p_value"] == pytest.approx(expected)
    assert accuracy["verdict"] == stats.verdict(expected)
    loss = result["metrics"]["loss"]
    assert loss["test"] == "paired bootstrap" and 0 < loss["p_value"] <= 1
    assert loss["difference_ci95"][0] <= loss["difference"] <= loss["difference_ci95"][1]

    assert cli.main(["eval", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"A: {a}", f"B: {b}", "both on the same test split, 300 examples"]
    row = next(line for line in lines if line.startswith("accuracy"))
    assert f"{accuracy['p_value']:.4f}" in row and accuracy["verdict"] in row and "McNemar exact" in row


def test_eval_pair_refuses_different_splits(spam_adapters, instruct_adapter, capsys):
    a, other = spam_adapters["short"], spam_adapters["other_seed"]
    assert cli.main(["eval", str(a), str(other)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {a} and {other} were not tested on the same split: data seed 123 vs 7\n"
    assert cli.main(["eval", str(a), str(instruct_adapter)]) == 2
    assert "adapters of two tasks" in capsys.readouterr().err
    assert cli.main(["eval", str(a), str(a), str(a)]) == 2
    assert "one adapter, or two" in capsys.readouterr().err


def test_instruct_eval_and_pair(instruct_adapter, capsys):
    """eval works for instruct through its task module: the recomputed metrics match the manifest, ROUGE-L has its
    interval, and an adapter against itself differs by nothing."""
    manifest = _manifest(instruct_adapter)
    for key in ("test", "test_base"):
        m = manifest["metrics"][key]
        assert m["rouge_l_ci95"][0] <= m["rouge_l"] <= m["rouge_l_ci95"][1]
    assert cli.main(["eval", str(instruct_adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches_manifest"] is True and report["test"]["rouge_l"] == manifest["metrics"]["test"]["rouge_l"]
    assert cli.main(["eval", str(instruct_adapter), str(instruct_adapter), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"rouge_l", "loss"}
    for m in result["metrics"].values():
        assert m["difference"] == 0 and m["p_value"] == 1.0 and m["verdict"] == "within noise"
