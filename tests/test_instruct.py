"""Instruction tuning on a small random-weight GPT-2 with the real tokenizer: label masking, an overfit run that
must answer and stop at EOS, reload with plain PEFT, and `generate` reproducing the stored responses."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lora_ft import cli, data
from lora_ft.core.config import load_config
from lora_ft.engine import models
from lora_ft.tasks import instruct

from .conftest import DATA_DIR, PAIRS, run_cli, tree_sha256

EOS = 50256
# Plain transformers + PEFT, nothing from lora_ft.
RELOAD = """
import sys, numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    logits = model(**tokenizer(sys.argv[4:], padding=True, return_tensors="pt")).logits
np.save(out, logits.numpy())
"""


def test_template():
    assert data.format_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert data.format_prompt("Do it.", "this").endswith(
        "### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Response:\n"
    )


def test_course_data_split_sizes():
    path = DATA_DIR / "instruction_data" / "instruction-data.json"
    splits = data.instruction_splits(data.read_instructions(path), seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "val": 55, "test": 110}
    again = data.instruction_splits(data.read_instructions(path), seed=123)
    assert splits["test"]["prompt"] == again["test"]["prompt"]
    other = data.instruction_splits(data.read_instructions(path), seed=7)
    assert splits["test"]["prompt"] != other["test"]["prompt"]


def test_labels_mask_exactly_the_prompt(tiny_gpt2: Path, tmp_path: Path):
    """What SFTTrainer feeds the model: prompt tokens and padding labelled -100; every response token and the
    final EOS kept as targets, although GPT-2 pads with that same EOS."""
    source = models.resolve_model(str(tiny_gpt2))
    tokenizer = models.load_tokenizer(source)
    config = load_config("instruct", overrides={"model": str(tiny_gpt2), "batch_size": 4})
    _, splits = instruct.load_splits(config)
    train = instruct.prompt_completion(splits["train"].select(range(4)), tokenizer.eos_token)
    trainer = instruct.build_trainer(
        config, models.load_causal_base(source, tokenizer), tokenizer, train, train, tmp_path, "fp32"
    )
    rows = trainer.train_dataset
    for row, prompt, output in zip(rows, train["prompt"], splits["train"]["output"][:4], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(output)["input_ids"] + [EOS]
        assert row["input_ids"] == prompt_ids + response_ids
        assert row["labels"] == [-100] * len(prompt_ids) + response_ids
        assert (row["input_ids"], row["labels"]) == instruct.encode(tokenizer, prompt, output + tokenizer.eos_token)

    batch = trainer.data_collator([rows[i] for i in range(4)])
    for ids, labels, row in zip(batch["input_ids"], batch["labels"], rows, strict=True):
        n = len(row["input_ids"])
        assert labels[:n].tolist() == row["labels"] and labels[n - 1] == EOS
        assert (labels[n:] == -100).all() and (ids[n:] == EOS).all()  # padding: EOS in, no target
    assert trainer.model.peft_config["default"].task_type == "CAUSAL_LM"

    # The loss SFTTrainer trains on projects through the LM head only where a response token is the target (TRL's
    # fused head: a 50k-wide product per token is most of a small model's work): it must equal the loss of the
    # full logits over every position, which `response_loss` computes, weighted per token.
    trainer.model.train(False)
    with torch.no_grad():
        fused = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()})
    plain = instruct.response_loss(trainer.model, tokenizer, train, batch_size=4)
    assert fused.item() == pytest.approx(plain["loss"], rel=1e-5)


def test_overfit_answers_and_stops_at_eos(instruct_run):
    result, _ = instruct_run
    responses = json.loads((result.adapter_dir / instruct.RESPONSES).read_text())
    assert len(responses) == 2
    for record in responses:
        assert set(record) == {"instruction", "input", "output", "model_response"}
        assert record["model_response"] == record["output"]
    test = result.manifest["metrics"]["test"]
    assert test["eos_share"] == 1.0 and test["rouge_l"] == 1.0
    assert test["mean_new_tokens"] < 24  # stopped at EOS, not at --max-new-tokens
    base = result.manifest["metrics"]["test_base"]
    assert base["eos_share"] == 0.0 and base["mean_new_tokens"] == 24  # the random base never stops
    assert test["loss"] < base["loss"] - 1


def test_generate_answers_training_instructions_and_stops(instruct_run, tmp_path: Path):
    result, _ = instruct_run
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"instruction": i, "input": x}) + "\n" for i, x, _ in PAIRS))
    done = run_cli("generate", str(result.adapter_dir), "--file", str(requests), "--json", "--max-new-tokens", "40")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["response"] for a in answers] == [output for _, _, output in PAIRS]
    assert all(a["stopped_at_eos"] for a in answers)


def test_adapter_folder_and_manifest(instruct_run, tiny_gpt2: Path):
    result, before = instruct_run
    folder = result.adapter_dir
    names = {f.name for f in folder.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lora_ft.json",
        "loss.png",
        "test_responses.json",
    } <= names
    assert not any(n.startswith(("checkpoint", ".")) for n in names)
    assert tree_sha256(tiny_gpt2) == before, "the base checkpoint was not touched"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["fan_in_fan_out"] is True
    manifest = json.loads((folder / "lora_ft.json").read_text())
    assert manifest["task"] == "instruct"
    assert manifest["data"]["split_sizes"] == {"train": 17, "val": 1, "test": 2}
    assert manifest["data"]["prompt_template"] == "alpaca"
    assert manifest["generation"] == {
        "greedy": True,
        "max_new_tokens": 24,
        "batch_size": 16,
        "stops_at": "<|endoftext|>",
    }
    assert manifest["training"]["steps"] == 200
    for key in ("loss", "perplexity", "rouge_l", "eos_share", "examples"):
        assert key in manifest["metrics"]["test"] and key in manifest["metrics"]["test_base"]
    assert manifest["metrics"]["test"]["perplexity"] == pytest.approx(np.exp(manifest["metrics"]["test"]["loss"]))


def test_plain_peft_reload_gives_training_logits(instruct_run, tiny_gpt2: Path, tmp_path: Path):
    result, _ = instruct_run
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    texts = [data.format_prompt(i, x) + o for i, x, o in PAIRS]
    with torch.no_grad():
        expected = result.model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    out = tmp_path / "logits.npy"
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_gpt2), str(result.adapter_dir), str(out), *texts],
        check=True,
        capture_output=True,
    )
    assert np.abs(np.load(out) - expected).max() <= 1e-5


def test_generate_reproduces_test_responses(instruct_run):
    result, _ = instruct_run
    responses = result.adapter_dir / instruct.RESPONSES
    done = run_cli("generate", str(result.adapter_dir), "--file", str(responses), "--json")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["response"] for a in answers] == [r["model_response"] for r in json.loads(responses.read_text())]


def test_chat_reads_instructions_from_stdin(instruct_run):
    result, _ = instruct_run
    done = run_cli("chat", str(result.adapter_dir), stdin="Name the capital of France.\nGive a synonym for happy.\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Paris.", "Joyful."]


def test_prompt_completion_data(tmp_path: Path):
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}\n' * 20)
    rows = data.read_instructions(path)
    assert rows[0] == {"instruction": "", "input": "", "prompt": "Q: 2+2?\nA:", "output": " 4"}
    assert data.read_requests(path, path.read_text())[0] == {"prompt": "Q: 2+2?\nA:"}


def test_instruct_cli_on_course_data(tiny_gpt2: Path, tmp_path: Path):
    """The command a user runs, on the real 1,100 examples: a few steps, two test answers."""
    output = tmp_path / "run"
    done = run_cli(
        "instruct", "--model", str(tiny_gpt2), "--output", str(output), "--max-steps", "3", "--test-limit", "2",
        "--max-new-tokens", "8", "--max-length", "60",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "untuned base" in done.stdout and f"adapter: {output}" in done.stdout
    assert "\r" not in done.stderr and "{'loss'" not in done.stderr
    manifest = json.loads((output / "lora_ft.json").read_text())
    assert manifest["data"]["split_sizes"] == {"train": 935, "val": 55, "test": 110}
    assert manifest["data"]["test_examples_generated"] == 2
    assert manifest["data"]["sha256"] == data.INSTRUCTION_DATA.sha256
    assert len(json.loads((output / instruct.RESPONSES).read_text())) == 2
    assert manifest["training"]["steps"] == 3
    # Examples over --max-length are left out of training and val, counted, and the count is reported.
    dropped = manifest["data"]["dropped_longer_than_max_length"]
    assert dropped["train"] > 0 and f"longer than --max-length 60 tokens, left out: {dropped}" in done.stdout


def test_generate_names_the_bad_line_of_a_file(instruct_run, tmp_path: Path, monkeypatch, capsys):
    result, _ = instruct_run
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"instruction": "Name the capital of France."}\n{"input": "no instruction"}\n')
    assert cli.main(["generate", str(result.adapter_dir), "--file", str(requests)]) == 2
    assert capsys.readouterr().err == f"error: {requests}: line 2 has no 'instruction'\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(requests.read_text().splitlines()[0]))
    assert cli.main(["generate", str(result.adapter_dir), "--file", "-"]) == 0
    assert capsys.readouterr().out.strip() == "Paris."


def test_cpu_loss_at_labelled_positions_is_sfttrainers(tiny_gpt2: Path, tmp_path: Path):
    """On the CPU lora_ft's SFT step runs the LM head only where a next token is trained: the same loss and the
    same gradients as TRL's own SFTTrainer loss, which scores every position there."""
    from trl import SFTTrainer

    from lora_ft.engine import methods, training

    from .conftest import write_examples

    values = {"model": str(tiny_gpt2), "data": str(write_examples(tmp_path / "four.json")), "max_length": 256}
    config = load_config("instruct", overrides=values | {"precision": "fp32", "lora_dropout": 0.0})
    source = models.resolve_model(config.model)
    tokenizer = models.load_tokenizer(source)
    base = models.load_causal_base(source, tokenizer)
    models.set_dropout(base, 0.0)  # the same function twice
    train = instruct.prompt_completion(instruct.load_splits(config)[1]["train"], tokenizer.eos_token)
    trainer = instruct.build_trainer(config, base, tokenizer, train, train, tmp_path / "out", "fp32")
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    assert methods.of(config).adapter and isinstance(trainer, training.Resumable)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(model, dict(batch))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, our_grads = loss_and_grads(trainer.compute_loss)
    theirs, their_grads = loss_and_grads(lambda m, b: SFTTrainer.compute_loss(trainer, m, b))
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"].numel() / 2  # the prompt's positions, most of a row, were not projected
