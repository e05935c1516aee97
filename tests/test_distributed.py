"""Data-parallel training: two CPU processes (gloo) started by torchrun train one adapter together; an adapter
saved from weights sharded by FSDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ft.engine import training
from lora_ft.tasks import classify

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
    (prediction,) = classify.predict(output, ["free prize call now"])
    assert prediction.label in {"ham", "spam"} and 0.5 <= prediction.score <= 1
    metrics, manifest = classify.evaluate(output)  # one process, in order: the gathered test logits were too
    assert metrics == manifest["metrics"]["test"]


def test_manifest_names_the_parallelism(ddp_run):
    output, _ = ddp_run
    assert json.loads((output / "lora_ft.json").read_text())["training"]["parallelism"] == "MULTI_CPU"


def test_sharded_adapter_is_saved_whole(tiny_gpt2: Path, tmp_path: Path):
    """torch's FSDP2 on 2 CPU processes: the adapter lora_ft saves from sharded weights (gathered on the main
    process) equals an unsharded copy's after the same step, and plain PEFT loads it to the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "tests" / "fsdp_worker.py"), str(tiny_gpt2), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded, plain = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("sharded", "plain"))
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        assert sharded[name].shape == tensor.shape, name
        assert torch.allclose(sharded[name], tensor, atol=1e-6), name
    assert max(t.abs().max().item() for n, t in plain.items() if "lora_B" in n) > 1e-3, "the step changed LoRA's B"

    input_ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(1))
    logits = []
    for name in ("sharded", "plain"):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2)
        base.config.pad_token_id = base.config.eos_token_id
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, tmp_path / name).eval()(input_ids=input_ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


@pytest.mark.skipif(not training.cpu_only(), reason="on a GPU machine accelerate runs FSDP")
def test_fsdp_recipe_on_cpus_is_refused_in_one_line(tiny_gpt2: Path, tmp_path: Path):
    """accelerate shards on GPUs only: its FSDP plugin fails deep inside on CPUs, so lora_ft says so first."""
    data = small_sms(tmp_path / "sms.txt", per_label=10)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(REPO / "recipes" / "accelerate" / "fsdp.yaml"), "-m", "lora_ft", "spam", "--model", str(tiny_gpt2)]
    command += ["--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "error: the accelerate config asks for FSDP, which accelerate runs on GPUs only" in said
    assert (
        "internal error" not in said and "lora_ft/cli/__init__.py" not in said
    )  # no traceback of lora_ft's (the launcher's own follows)
    assert not (tmp_path / "out").exists()
