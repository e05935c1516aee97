"""The first run on a fresh machine: no GPT-2 to be had means the fallback model, said in one line; progress a person
can follow; --quiet; TensorBoard."""

import json
from pathlib import Path

import pytest
import yaml

from lora_ft import cli
from lora_ft.core import config, files
from lora_ft.core.config import DEFAULT_MODEL, FALLBACK_RECIPES, fallback_recipe, load_config

FALLBACK_LINE = "training the bundled SmolLM2-135M instead (spam-smollm2.yaml) — pass --model gpt2 to insist"


@pytest.fixture
def nothing_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


@pytest.fixture
def tiny_fallback(tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fallback recipe, on the tiny test model instead of SmolLM2-135M (which is not fetched in tests)."""
    monkeypatch.setitem(FALLBACK_RECIPES, "spam", {**FALLBACK_RECIPES["spam"], "model": str(tiny_gpt2)})
    return tiny_gpt2


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_without_gpt2_the_fallback_trains_and_says_so(
    network: str, nothing_cached: Path, tiny_fallback: Path, tmp_path: Path, monkeypatch, capsys
):
    if network == "unreachable":  # no offline mode, and a Hub endpoint where nothing listens
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(files, "hub_endpoint", lambda: "http://127.0.0.1:9")
    output = tmp_path / "first"
    assert cli.main(["spam", "--output", str(output), "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "GPT-2 is not reachable" in line]
    assert len(notices) == 1 and notices[0].startswith("note: GPT-2 is not reachable (")
    assert notices[0].endswith(FALLBACK_LINE)
    assert err.index(notices[0]) < err.index("training:")  # said before training starts
    manifest = json.loads((output / "lora_ft.json").read_text())
    assert manifest["config"]["model"] == str(tiny_fallback)
    assert manifest["config"]["model_fallback"].startswith("GPT-2 is not reachable (")
    assert manifest["training"]["steps"] == 6  # the flag on top of the fallback recipe
    assert manifest["config"]["epochs"] == FALLBACK_RECIPES["spam"]["epochs"]


def test_gpt2_in_the_cache_is_the_default_offline(nothing_cached: Path, tiny_fallback: Path):
    snapshot = nothing_cached / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    chosen = load_config("spam")
    assert (chosen.model, chosen.model_fallback, chosen.epochs) == (DEFAULT_MODEL, None, 3.0)


def test_a_reachable_hub_means_gpt2(nothing_cached: Path, tiny_fallback: Path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(files, "hub_reachable", lambda timeout=3.0: True)
    assert load_config("spam").model == DEFAULT_MODEL
    assert load_config("spam", overrides={"model": "gpt2"}).model == "gpt2"


@pytest.mark.parametrize("task", config.TASKS)
def test_fallback_recipe_file_equals_the_builtin_one(task: str):
    assert yaml.safe_load(fallback_recipe(task).read_text()) == {"task": task, **FALLBACK_RECIPES[task]}


def test_quiet_prints_only_the_results(tiny_gpt2: Path, tmp_path: Path, capsys):
    assert (
        cli.main(["spam", "--model", str(tiny_gpt2), "--output", str(tmp_path / "q"), "--max-steps", "2", "--quiet"])
        == 0
    )
    out, err = capsys.readouterr()
    assert err == ""
    head = ["split", "accuracy", "accuracy 95% CI", "precision", "recall", "f1", "f1 95% CI", "loss", "n"]
    assert [column.strip() for column in out.splitlines()[0].split("  ") if column.strip()] == head
    assert out.splitlines()[-1] == f"adapter: {tmp_path / 'q'}"


def test_report_to_tensorboard_keeps_the_logs_in_the_adapter(tiny_gpt2: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "tb"
    args = [
        "spam",
        "--model",
        str(tiny_gpt2),
        "--output",
        str(output),
        "--max-steps",
        "4",
        "--report-to",
        "tensorboard",
    ]
    assert cli.main([*args, "--quiet"]) == 0
    events = list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    assert {"train/loss", "eval/accuracy"} <= set(accumulator.Tags()["scalars"])
    assert json.loads((output / "lora_ft.json").read_text())["config"]["report_to"] == "tensorboard"
