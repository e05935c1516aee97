"""`prefer`: DPO with LoRA from an instruct adapter (or the base), its data readers, its split (instruct's), the frozen
reference on the one base, the saved adapter, and an interrupted run resumed to the same adapter."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ft import data
from lora_ft.core.config import FALLBACK_RECIPES, fallback_recipe, load_config
from lora_ft.core.errors import UserError
from lora_ft.core.files import sha256_file
from lora_ft.data import pairs
from lora_ft.engine import adapters
from lora_ft.export import merge
from lora_ft.tasks import instruct, prefer

from .conftest import DATA_DIR, PAIRS, run_cli

# fp32 pinned: the exact comparisons below must hold on CPUs with native bf16 too
TINY = {"max_new_tokens": 8, "max_length": 256, "precision": "fp32", "batch_size": 4, "test_limit": 2}


def write_pairs(path: Path) -> Path:
    """The instruct fixture's four examples, five copies each, the right answer chosen over a curt refusal; and one
    degenerate pair, which is dropped."""
    rows = [{"instruction": i, "input": x, "chosen": o, "rejected": "No."} for _ in range(5) for i, x, o in PAIRS]
    rows.append({"instruction": "Say it twice.", "input": "", "chosen": "It.", "rejected": "It."})
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def prefer_run(instruct_run, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """DPO for a few steps from the instruct fixture's adapter."""
    start = instruct_run[0].adapter_dir
    folder = tmp_path_factory.mktemp("prefer")
    overrides = TINY | {
        "data": str(write_pairs(folder / "pairs.json")),
        "from_adapter": str(start),
        "output": str(folder / "adapter"),
        "max_steps": 8,
        "lr": 1e-2,
    }
    return prefer.train(load_config("prefer", overrides=overrides)), start


def _logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _base(tiny_gpt2: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32).eval()


TEXT = data.format_prompt("Name the capital of France.") + "Paris."


def test_saved_adapter_reloads_with_plain_peft_to_the_trained_logits(prefer_run, tiny_gpt2: Path):
    result, _ = prefer_run
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    reloaded = PeftModel.from_pretrained(_base(tiny_gpt2), result.adapter_dir).eval()
    result.model.set_adapter(prefer.POLICY)
    assert torch.allclose(_logits(reloaded, tokenizer, TEXT), _logits(result.model, tokenizer, TEXT), atol=1e-5)
    saved = sorted(p.name for p in result.adapter_dir.iterdir())
    assert prefer.REFERENCE not in saved  # the reference is not part of the adapter
    assert {"adapter_model.safetensors", "loss.png", prefer.MARGINS_PLOT, prefer.RESPONSES} <= set(saved)


def test_the_reference_is_the_starting_adapter_frozen(prefer_run, tiny_gpt2: Path):
    """After training, the model's reference adapter gives the instruct adapter's logits, and the trained one
    does not: DPO moved the policy, not the reference."""
    result, start = prefer_run
    tokenizer = AutoTokenizer.from_pretrained(start)
    started = _logits(PeftModel.from_pretrained(_base(tiny_gpt2), start).eval(), tokenizer, TEXT)
    result.model.set_adapter(prefer.REFERENCE)
    try:
        reference = _logits(result.model, tokenizer, TEXT)
    finally:
        result.model.set_adapter(prefer.POLICY)
    # Equal to float32 rounding: the trained model may run another attention kernel than a fresh load (per batch).
    assert torch.allclose(reference, started, atol=1e-5, rtol=0)
    assert (_logits(result.model, tokenizer, TEXT) - started).abs().max() > 1e-4
    section = result.manifest.preference
    assert section["start"] == {
        "path": str(start),
        "task": "instruct",
        "adapter_sha256": sha256_file(start / "adapter_model.safetensors"),
    }
    assert (section["beta"], section["loss_type"], section["separate_reference_model"]) == (0.1, "sigmoid", False)
    # before training the policy is the reference: every implicit reward is 0, the loss ln 2
    before = result.manifest.metrics["test_start"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["reward_margin"] == 0
    after = result.manifest.metrics["test"]
    assert after["loss"] < before["loss"] and after["reward_margin"] > 0


def test_one_copy_of_the_base_in_memory(prefer_run, tiny_gpt2: Path):
    """The parameters the trainer held: one base, and the adapter twice (trained and reference), nothing more."""
    result, _ = prefer_run
    base = sum(p.numel() for p in _base(tiny_gpt2).parameters())
    adapter = sum(t.numel() for t in load_file(result.adapter_dir / "adapter_model.safetensors").values())
    assert result.manifest.metrics["parameters_in_memory"] == base + 2 * adapter


def test_manifest_and_answers(prefer_run):
    result, _ = prefer_run
    manifest = adapters.read_manifest(result.adapter_dir)
    assert manifest.task == "prefer" and manifest.config["from_adapter"] == str(prefer_run[1])
    assert sum(manifest.data["dropped_degenerate"].values()) == 1
    assert manifest.data["prompt_template"] == "alpaca"
    records = json.loads((result.adapter_dir / prefer.RESPONSES).read_text())
    assert len(records) == 2 and {"instruction", "chosen", "rejected", "model_response"} <= set(records[0])
    # generate (and so chat and serve) answers with it as with an instruct adapter, reproducing the test answers
    answers = instruct.respond(result.adapter_dir, [{k: r[k] for k in ("instruction", "input")} for r in records])
    assert [a.response for a in answers] == [r["model_response"] for r in records]
    listed = [row for row in adapters.list_adapters(result.adapter_dir.parent) if row.task == "prefer"]
    assert listed[0].metric == "reward_accuracy" and listed[0].value == manifest.metrics["test"]["reward_accuracy"]


def test_merges_with_a_gguf_export(prefer_run, tmp_path: Path):
    """merge checks the merged logits against base + adapter on the adapter's own test pairs (prompt + chosen), and
    the GGUF export read back against them."""
    result, _ = prefer_run
    merged = merge.merge(result.adapter_dir, tmp_path / "export", gguf="f32")
    check = merged.manifest.merge["check"]
    assert check["max_abs_logit_diff_float32"] < 1e-4 and (tmp_path / "export" / "export.gguf").is_file()
    assert check["inputs"].startswith("the first 3 test examples of")  # prompt + chosen of its test pairs


def test_split_equals_instructs(monkeypatch):
    """The course's preference file split by the same seed: the same instructions in each split as instruct's, so
    prefer never trains on what instruct is tested on. The shipped copy is the one checked by its sha256."""
    monkeypatch.delenv(data.DATA_DIR_ENV)
    config = load_config("prefer", overrides={"model": "gpt2"})
    path, preference = prefer.load_splits(config)
    assert path == data.PREFERENCE_DATA.bundled and sha256_file(path) == data.PREFERENCE_DATA.sha256
    _, instruction = instruct.load_splits(load_config("instruct", overrides={"model": "gpt2"}))
    assert {k: len(v) for k, v in preference.items()} == {"train": 935, "val": 55, "test": 110}
    for split in data.SPLITS:
        assert preference[split]["instruction"] == instruction[split]["instruction"]
        assert preference[split]["input"] == instruction[split]["input"]
    # The same records, not only the same texts: the course's data repeats some instructions (25 records), so a
    # text-level check would also find instruct's own train/test overlap. Record by record, prefer's training pairs
    # are instruct's training examples (the same output beside each), and none of instruct's test records.
    records = json.loads(data.INSTRUCTION_DATA.bundled.read_text())
    course = json.loads(path.read_text())
    assert [(r["instruction"], r["input"], r["output"]) for r in records] == [
        (r["instruction"], r["input"], r["output"]) for r in course
    ]
    parts = data.split_indices(len(course), data.INSTRUCTION_FRACTIONS, np.random.default_rng(config.seed))
    trained, tested = (set(part.tolist()) for part in (parts[0], parts[2]))
    assert [course[i]["chosen"] for i in parts[0]] == preference["train"]["chosen"]
    assert [records[i]["instruction"] for i in parts[2]] == instruction["test"]["instruction"]
    assert not trained & tested
    assert sum(map(pairs.degenerate, (row for split in preference.values() for row in split))) == 6


def test_trl_formats_jsonl_and_conversations(tmp_path: Path):
    standard = tmp_path / "standard.jsonl"
    standard.write_text('{"prompt": "Q: 2+2?\\nA:", "chosen": " 4", "rejected": " 5"}\n\n')
    (row,) = pairs.read_pairs(standard)
    assert pairs.request(row) == {"prompt": "Q: 2+2?\nA:"} and (row["chosen"], row["rejected"]) == (" 4", " 5")
    user = [{"role": "user", "content": "Hi"}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "What."}],
    }
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    conversations = tmp_path / "chat.json"
    conversations.write_text(json.dumps([explicit, implicit]))
    rows = pairs.read_pairs(conversations)
    assert [pairs.request(r) for r in rows] == [{"messages": user}] * 2
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("Hello!", "What.")] * 2


BAD = [
    ("missing.json", [{"instruction": "a", "chosen": "b"}], "missing.json: item 1 has no 'rejected'"),
    ("type.jsonl", None, "type.jsonl: line 2: 'chosen' must be a string, got int"),
    ("empty.json", [{"instruction": " ", "chosen": "b", "rejected": "c"}], "item 1 has an empty 'instruction'"),
    (
        "mixed.json",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"instruction": "a", "chosen": "b", "rejected": "c"}],
        "mixed.json: item 2 is an instruction record, but item 1 is a prompt string",
    ),
    (
        "turns.json",
        [
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}],
            }
        ],
        "turns.json: item 1: without 'prompt', 'chosen' and 'rejected' must share every turn but their last",
    ),
    (
        "last.json",
        [
            {
                "prompt": [{"role": "user", "content": "a"}],
                "chosen": [{"role": "user", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
            }
        ],
        "last.json: item 1: 'chosen' must end in one assistant message answering the prompt",
    ),
]


@pytest.mark.parametrize(("name", "records", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_preference_file_is_one_line(tmp_path: Path, name: str, records, message: str):
    path = tmp_path / name
    if records is None:
        path.write_text(
            '{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a", "chosen": 1, "rejected": "c"}\n'
        )
    else:
        path.write_text(json.dumps(records))
    with pytest.raises(UserError) as error:
        pairs.read_pairs(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_preference_file_exits_2_with_one_line(tiny_gpt2: Path, tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "chosen": "b"}]))
    done = run_cli("prefer", "--model", str(tiny_gpt2), "--data", str(path), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {path}: item 1 has no 'rejected'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_broken_starting_adapter_is_one_line(instruct_run, damage: str, tmp_path: Path):
    """prefer's --from adapter loads through the same checks as every other load: its weights cut short or gone are
    one line naming the file, exit 2, before anything is written."""
    start = tmp_path / "start"
    shutil.copytree(instruct_run[0].adapter_dir, start)
    weights = start / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        weights.unlink()
    data_file = write_pairs(tmp_path / "pairs.json")
    out = tmp_path / "out"
    done = run_cli("prefer", "--from", str(start), "--data", str(data_file), "--output", str(out), "--max-steps", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    why = "corrupt or incomplete (" if damage == "truncated" else "missing"
    assert done.stderr.startswith(f"error: {weights}: {why}") and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.json", "start"]


def test_recipes_restate_the_defaults():
    assert yaml.safe_load(fallback_recipe("prefer").read_text()) == {"task": "prefer", **FALLBACK_RECIPES["prefer"]}
    assert load_config("prefer", overrides={"model": "gpt2"}).beta == 0.1


def test_interrupted_prefer_resumes_to_the_uninterrupted_adapter(instruct_run, tiny_gpt2: Path, tmp_path: Path):
    """SIGINT once the first epoch's checkpoint is written, then --resume: the adapter and metrics of a run never
    stopped."""
    data_file = write_pairs(tmp_path / "pairs.json")
    flags = [
        "--from",
        str(instruct_run[0].adapter_dir),
        "--data",
        str(data_file),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--eval-batch-size",
        "1",  # the three test pairs in three batches: their bar is shown
        "--lr",
        "1e-2",
        "--max-new-tokens",
        "4",
        "--test-limit",
        "1",
        "--precision",
        "fp32",
        "--max-length",
        "256",
    ]
    whole = run_cli("prefer", *flags, "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stderr.count("evaluating on test: 100% 3/3") == 2  # the test pairs, before and after, named so
    started = subprocess.Popen(
        [sys.executable, "-m", "lora_ft", "prefer", *flags, "--output", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=os.environ.copy(),
    )
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    deadline = time.monotonic() + 300
    while started.poll() is None and time.monotonic() < deadline:
        if any(checkpoints.glob("checkpoint-*/trainer_state.json")):
            os.killpg(started.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = started.communicate(timeout=300)
    assert started.returncode == 128 + signal.SIGINT, err[-3000:]
    assert any(line.startswith("interrupted by SIGINT at step ") for line in err.splitlines())
    done = run_cli("prefer", "--resume", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, reference = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("run", "whole"))
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    manifests = [json.loads((tmp_path / name / "lora_ft.json").read_text()) for name in ("run", "whole")]
    assert manifests[0]["metrics"] == manifests[1]["metrics"]
    assert manifests[0]["training"]["resumed_at_steps"] and not manifests[1]["training"]["resumed_at_steps"]


def test_course_file_is_shipped_unchanged():
    shipped = data.PREFERENCE_DATA.bundled
    assert sha256_file(shipped) == sha256_file(DATA_DIR / data.PREFERENCE_DATA.relpath)


def test_the_fused_head_scores_labelled_positions_on_a_cpu_to_the_same_log_probs(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
):
    """DPOTrainer's log-probabilities come from TRL's fused LM head, which on a CPU scored every position, prompt
    and padding too; lora_ft switches it to the labelled positions only (`hardware`): the same log-probabilities."""
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from lora_ft.engine import hardware

    shipped = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", shipped)  # as TRL ships it (restored after the test)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ids = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < torch.tensor([[4], [7], [10]]), -100)  # prompts of 4, 7 and 10
    with torch.no_grad():
        every = model(input_ids=ids, labels=labels, fused_lm_head=True)
        assert not trl_utils._use_triton(torch.device("cpu"))
        hardware.fused_head_at_labelled_positions()
        assert trl_utils._use_triton(torch.device("cpu"))
        labelled = model(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(labelled, name), getattr(every, name))
    assert torch.equal(labelled.is_top1, every.is_top1)
    assert (labelled.log_probs[labels[:, 1:] == -100] == 0).all()
