"""Train a LoRA classifier on a small random-weight GPT-2 with the real tokenizer and the real SMS data."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_ft import cli
from lora_ft.core.config import load_config
from lora_ft.tasks import classify

from .conftest import run_cli, tree_sha256

TEXTS = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now",
    "see you at 5",
    "Ok lar... Joking wif u oni...",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
]

# Plain transformers + PEFT, nothing from lora_ft: what a user elsewhere would write.
RELOAD = """
import sys, numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base, adapter, out = sys.argv[1:4]
texts = sys.argv[4:]
tokenizer = AutoTokenizer.from_pretrained(adapter)
model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=tokenizer.pad_token_id)
model = PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
np.save(out, logits.numpy())
"""


def logits_of(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


def test_adapter_folder_contents(spam_run, tiny_gpt2: Path):
    result, _ = spam_run
    folder = result.adapter_dir
    names = {f.name for f in folder.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lora_ft.json",
        "loss.png",
        "confusion_matrix.png",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not any(n.startswith(("checkpoint", ".")) for n in names)
    assert not list(folder.parent.glob(".*tmp*")), "the temp folder was renamed away"

    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_gpt2)
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert adapter_config["fan_in_fan_out"] is True
    assert set(adapter_config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}

    tensors = load_file(folder / "adapter_model.safetensors")
    assert all("lora_" in k or ".score." in k for k in tensors), sorted(tensors)[:5]
    assert any(".score." in k for k in tensors), "the trained classification head is saved with the adapter"
    # 13 MB random base with a 50k-token embedding; the adapter carries no base weights.
    base_bytes = (tiny_gpt2 / "model.safetensors").stat().st_size
    assert (folder / "adapter_model.safetensors").stat().st_size < 0.05 * base_bytes

    for png in ("loss.png", "confusion_matrix.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest(spam_run, tiny_gpt2: Path):
    result, _ = spam_run
    manifest = json.loads((result.adapter_dir / "lora_ft.json").read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["task"] == "spam"
    assert manifest["config"]["max_steps"] == 60 and manifest["config"]["seed"] == 123
    assert manifest["base"]["kind"] == "local" and manifest["base"]["location"] == str(tiny_gpt2)
    assert len(manifest["base"]["weights_sha256"]) == 64
    assert manifest["data"]["sha256"] == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
    assert manifest["data"]["split_sizes"] == {"train": 1045, "val": 149, "test": 300}
    assert manifest["labels"] == {"ham": 0, "spam": 1}
    for split, n in (("train", 1045), ("val", 149), ("test", 300)):
        m = manifest["metrics"][split]
        assert m["examples"] == n
        assert np.array(m["confusion_matrix"]).sum() == n
        assert m["accuracy"] == pytest.approx(np.trace(m["confusion_matrix"]) / n)
        assert {"precision", "recall", "f1", "loss"} <= set(m)
    assert manifest["training"]["steps"] == 60 and manifest["training"]["seconds"] > 0
    assert {"torch", "transformers", "peft", "datasets"} <= set(manifest["versions"])
    assert manifest["lora"]["trainable_parameters"] < manifest["lora"]["total_parameters"] * 0.1


def test_training_learns_something(spam_run):
    # 60 steps on a random 2-layer model: well above the 50% of a balanced coin, not yet good.
    assert spam_run[0].manifest["metrics"]["test"]["accuracy"] > 0.6


def test_base_weights_untouched(spam_run, tiny_gpt2: Path):
    _, before = spam_run
    assert tree_sha256(tiny_gpt2) == before


def test_plain_peft_reload_in_fresh_process_gives_same_logits(spam_run, tiny_gpt2: Path, tmp_path: Path):
    result, _ = spam_run
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    expected = logits_of(result.model.eval(), tokenizer, TEXTS)
    out = tmp_path / "logits.npy"
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_gpt2), str(result.adapter_dir), str(out), *TEXTS],
        check=True,
        capture_output=True,
    )
    reloaded = np.load(out)
    assert reloaded.shape == (len(TEXTS), 2)
    assert np.abs(reloaded - expected).max() <= 1e-5
    # Padding must not change a message's logits: the head pools the last real token.
    alone = logits_of(result.model, tokenizer, TEXTS[1:2])
    assert np.abs(alone - expected[1:2]).max() <= 1e-5


def test_eval_recomputes_manifest_metrics(spam_run, capsys):
    result, _ = spam_run
    assert cli.main(["eval", str(result.adapter_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches_manifest"] is True
    assert report["test"]["accuracy"] == result.manifest["metrics"]["test"]["accuracy"]
    assert report["test"]["confusion_matrix"] == result.manifest["metrics"]["test"]["confusion_matrix"]


def test_predict_cli_matches_library(spam_run, monkeypatch, capsys):
    result, _ = spam_run
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS[1:])))
    assert cli.main(["predict", str(result.adapter_dir), TEXTS[0], "--file", "-", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == TEXTS
    library = classify.predict(result.adapter_dir, TEXTS)
    assert [line["label"] for line in lines] == [p.label for p in library]
    assert all(line["label"] in {"ham", "spam"} and 0.5 <= line["score"] <= 1 for line in lines)
    assert [line["score"] for line in lines] == pytest.approx([p.score for p in library], abs=1e-6)

    assert cli.main(["predict", str(result.adapter_dir), "see you at 5"]) == 0
    assert capsys.readouterr().out.split("\t")[2].strip() == "see you at 5"


def test_predict_streams_its_input_in_chunks(spam_run, tmp_path: Path):
    """Labels come out before standard input ends (a chunk at a time: memory bounded, first lines within seconds),
    each as labelled in other batches; a line that is not UTF-8 is named."""
    adapter = str(spam_run[0].adapter_dir)
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(classify.CHUNK + 200)]
    child = subprocess.Popen(
        [sys.executable, "-m", "lora_ft", "predict", adapter, "--file", "-", "--json", "--quiet"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child.stdin.write("".join(f"{t}\n" for t in texts[: classify.CHUNK]))
    child.stdin.flush()
    first = json.loads(child.stdout.readline())  # standard input is still open: only a whole chunk was read
    child.stdin.write("".join(f"{t}\n" for t in texts[classify.CHUNK :]))
    child.stdin.close()
    rows = [first, *map(json.loads, child.stdout)]
    assert child.wait() == 0 and [row["text"] for row in rows] == texts
    apart = classify.predict(adapter, texts[:40])  # in other batches than the stream's (it sorts each chunk)
    assert [row["label"] for row in rows[:40]] == [p.label for p in apart]
    assert [row["score"] for row in rows[:40]] == pytest.approx([p.score for p in apart], abs=1e-5)

    (tmp_path / "texts.txt").write_bytes(b"see you at 5\n\xff\xfe binary\n")
    done = run_cli("predict", adapter, "--file", str(tmp_path / "texts.txt"), "--quiet")
    assert (
        done.returncode == 2
        and done.stderr == f"error: {tmp_path / 'texts.txt'}: line 2 is not UTF-8 text (binary input?)\n"
    )


def test_same_seed_same_split_and_weights(tiny_gpt2: Path, tmp_path: Path):
    def run(seed: int, name: str):
        config = load_config(
            "spam", overrides={"model": str(tiny_gpt2), "output": str(tmp_path / name), "max_steps": 8, "seed": seed}
        )
        result = classify.train(config)
        tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
        return result.manifest, tensors

    first, weights_a = run(7, "a")
    second, weights_b = run(7, "b")
    other, weights_c = run(8, "c")
    assert first["metrics"] == second["metrics"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(not torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert (
        first["metrics"]["test"]["confusion_matrix"] != other["metrics"]["test"]["confusion_matrix"]
        or first["metrics"]["test"]["loss"] != other["metrics"]["test"]["loss"]
    )


def test_user_csv_with_own_labels(tiny_gpt2: Path, tmp_path: Path):
    rows = [
        ("the meeting moved to 3pm", "work"),
        ("dinner at mum's on sunday?", "family"),
        ("your invoice #442 is attached", "work"),
        ("happy birthday sis!!", "family"),
        ("quarterly report due friday", "work"),
        ("grandma says hi", "family"),
    ] * 8
    csv_path = tmp_path / "mail.csv"
    csv_path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    done = run_cli(
        "spam", "--model", str(tiny_gpt2), "--data", str(csv_path), "--epochs", "4", "--output", str(tmp_path / "mail")
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "mail" / "lora_ft.json").read_text())
    assert manifest["labels"] == {"family": 0, "work": 1}
    # Four evaluations on val; the adapter written is the best of them, not the last.
    assert sum("eval_accuracy" in entry for entry in manifest["training"]["log_history"]) == 4
    assert manifest["metrics"]["val"]["accuracy"] == manifest["training"]["best_val_accuracy"]
    assert manifest["data"]["path"] == str(csv_path)
    # Output to a pipe (CI, a log file): progress as whole lines, no carriage returns, no raw dicts; a readable line
    # per evaluation.
    assert "\r" not in done.stderr + done.stdout
    assert not [line for line in done.stderr.splitlines() if line.lstrip().startswith("{")]
    evaluations = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert len(evaluations) == 4 and all("train loss" in e and "val accuracy" in e for e in evaluations), done.stderr
    assert evaluations[0].startswith("epoch 1.00/4, step 5: ")  # 33 training rows, batches of 8
    assert any(line.startswith("training: 100% 20/20 [") for line in done.stderr.splitlines()), done.stderr
    labels = {p.label for p in classify.predict(tmp_path / "mail", ["see you sunday", "invoice attached"])}
    assert labels <= {"family", "work"}


def test_eval_refuses_changed_data(tiny_gpt2: Path, tmp_path: Path, capsys):
    from .conftest import DATA_DIR

    data_copy = tmp_path / "SMSSpamCollection"
    data_copy.write_bytes((DATA_DIR / "sms_spam_collection" / "SMSSpamCollection").read_bytes())
    config = load_config(
        "spam",
        overrides={"model": str(tiny_gpt2), "data": str(data_copy), "output": str(tmp_path / "a"), "max_steps": 2},
    )
    classify.train(config)
    with open(data_copy, "a") as f:
        f.write("spam\tone more line\n")
    capsys.readouterr()  # what training printed; the assertion is on what `eval` prints
    assert cli.main(["eval", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data_copy}: not the data this adapter was trained on")
