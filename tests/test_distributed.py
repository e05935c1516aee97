"""Data-parallel training: two CPU processes (gloo) started by torchrun train one adapter together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ft import spam

from .conftest import DATA_DIR, REPO

BATCH_SIZE = 4


def small_sms(path: Path, per_label: int = 40) -> Path:
    """The first `per_label` ham and spam messages of the SMS Spam Collection (evaluation then takes no time)."""
    lines = (DATA_DIR / "sms_spam_collection" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    picked = [[line for line in lines if line.startswith(label + "\t")][:per_label] for label in ("ham", "spam")]
    path.write_text("\n".join(picked[0] + picked[1]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ddp_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`torchrun --nproc_per_node 2 -m lora_ft spam` for a few steps, alone in its parent folder."""
    data = small_sms(tmp_path_factory.mktemp("data") / "sms.txt")
    output = tmp_path_factory.mktemp("ddp") / "spam-ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "lora_ft", "spam", "--model", str(tiny_gpt2), "--data", str(data), "--output", str(output)]
    command += ["--max-steps", "3", "--batch-size", str(BATCH_SIZE), "--max-length", "32", "--eval-batch-size", "64"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done


def test_one_adapter_folder_and_no_temp_folders(ddp_run):
    output, done = ddp_run
    assert [p.name for p in output.parent.iterdir()] == [output.name]
    names = {p.name for p in output.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "lora_ft.json", "loss.png"} <= names
    assert not any(n.startswith(("checkpoint", ".")) for n in names)
    assert done.stdout.count("adapter: ") == 1, "only the main process reports"


def test_manifest_records_both_processes(ddp_run):
    output, _ = ddp_run
    training = json.loads((output / "lora_ft.json").read_text())["training"]
    assert training["world_size"] == 2
    assert training["global_batch_size"] == 2 * BATCH_SIZE
    assert training["steps"] == 3
    # The logged train loss is a per-example mean (about ln 2 for a fresh two-class head), not a sum over processes.
    losses = [entry["loss"] for entry in training["log_history"] if "loss" in entry]
    assert losses and all(0.3 < loss < 1.2 for loss in losses)


def test_adapter_loads_predicts_and_reproduces_its_metrics(ddp_run):
    output, _ = ddp_run
    (prediction,) = spam.predict(output, ["free prize call now"])
    assert prediction.label in {"ham", "spam"} and 0.5 <= prediction.score <= 1
    metrics, manifest = spam.evaluate(output)  # one process, in order: the gathered test logits were too
    assert metrics == manifest["metrics"]["test"]
