"""PEFT methods (`method`, `use_rslora`, `init_lora_weights`): each trains a few steps on a tiny GPT-2, saves, and
loads back with plain PEFT (or plain transformers, for full fine-tuning) to the logits the trained model gave; merge
where the method merges; the combinations PEFT cannot do refused in one line."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError
from lora_ft.engine import adapters, methods
from lora_ft.export import merge
from lora_ft.serve import pool
from lora_ft.tasks import classify, instruct

from .conftest import EXACT, run_cli, write_examples

TEXTS = ["WINNER! Claim your free prize now", "see you at lunch tomorrow?", "Call 0800 to win cash"]


def write_spam(path: Path) -> Path:
    """40 short messages, 20 of each label: a split of 28/4/8, a run of a few seconds."""
    ham = [f"hey, are we still meeting at {h} tonight? bring the book" for h in range(20)]
    spam_ = [f"WIN a {h}00 pound prize! text CLAIM to 8{h}21 now" for h in range(20)]
    path.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam_))
    return path


@pytest.fixture(scope="module")
def spam_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spam(tmp_path_factory.mktemp("methods") / "sms.tsv")


def _logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def _train_spam(tiny_gpt2: Path, data: Path, output: Path, **overrides):
    config = load_config(
        "spam",
        overrides={"model": str(tiny_gpt2), "data": str(data), "output": str(output), "max_steps": 3}
        | EXACT
        | overrides,
    )
    return classify.train(config)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("dora", {"method": "dora"}),
        ("ia3", {"method": "ia3"}),
        ("vera", {"method": "vera", "lora_r": 8}),
        ("rslora-gaussian", {"use_rslora": True, "init_lora_weights": "gaussian", "lora_r": 4}),
        ("pissa", {"init_lora_weights": "pissa", "lora_r": 4}),
    ],
)
def test_method_saves_an_adapter_plain_peft_loads(tiny_gpt2: Path, spam_data: Path, tmp_path: Path, name, overrides):
    result = _train_spam(tiny_gpt2, spam_data, tmp_path / name, lr=5e-2, **overrides)
    folder = result.adapter_dir
    manifest = json.loads((folder / "lora_ft.json").read_text())
    assert manifest["lora"]["method"] == overrides.get("method", "lora")
    assert manifest["config"]["init_lora_weights"] == overrides.get("init_lora_weights", "default")
    assert not (folder / methods.INITIAL_ADAPTER).exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    trained = _logits(result.model, tokenizer, TEXTS)
    # plain PEFT, on the untouched base (PiSSA's adapter was converted to plain LoRA, so the base needs no change)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2, pad_token_id=50256)
    reloaded = _logits(PeftModel.from_pretrained(base, folder), tokenizer, TEXTS)
    assert torch.allclose(reloaded, trained, atol=1e-5), (reloaded - trained).abs().max()
    merged = merge.merge(folder, tmp_path / f"{name}-merged")
    assert merged.manifest.merge["check"]["max_abs_logit_diff_float32"] < 1e-4


def test_full_fine_tuning_saves_the_whole_model(tiny_gpt2: Path, spam_data: Path, tmp_path: Path, spam_run):
    result = _train_spam(tiny_gpt2, spam_data, tmp_path / "full", method="full", lr=1e-3)
    folder = result.adapter_dir
    manifest = adapters.read_manifest(folder)
    assert manifest.lora["method"] == "full"
    assert manifest.lora["trainable_parameters"] == manifest.lora["total_parameters"]
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForSequenceClassification.from_pretrained(folder)  # plain transformers: no lora_ft, no PEFT
    assert torch.allclose(_logits(plain, tokenizer, TEXTS), _logits(result.model, tokenizer, TEXTS), atol=1e-5)
    assert [p.label for p in classify.predict(folder, TEXTS)] == [
        manifest.label_names[i] for i in _logits(plain, tokenizer, TEXTS).argmax(-1).tolist()
    ]
    listed = adapters.describe_folder(folder)
    assert (listed.kind, listed.method) == ("full model", "full")
    with pytest.raises(UserError, match="already whole"):
        merge.merge(folder, tmp_path / "merged")
    # served beside a LoRA adapter of the same base: a base of its own, each answering as `predict` does
    lora = spam_run[0].adapter_dir
    registry = pool.load([str(folder), str(lora)])
    assert len(registry.bases) == 2
    described = {m["id"]: m for m in registry.models()}
    assert {name: m["method"] for name, m in described.items()} == {folder.name: "full", lora.name: "lora"}
    assert described[folder.name]["weight_bytes"] >= (folder / "model.safetensors").stat().st_size * 0.9
    for name, path in ((folder.name, folder), (lora.name, lora)):
        done = queue.Queue()
        registry.classify(name, TEXTS, lambda kind, value, done=done: done.put((kind, value)))
        kind, served = done.get(timeout=60)
        assert kind == "done" and [p.label for p in served] == [p.label for p in classify.predict(path, TEXTS)]


@pytest.mark.parametrize("method", ["ia3", "full"])
def test_instruct_methods(tiny_gpt2: Path, tmp_path: Path, method: str):
    overrides = {
        "model": str(tiny_gpt2),
        "data": str(write_examples(tmp_path / "four.json")),
        "output": str(tmp_path / method),
        "method": method,
        "max_steps": 2,
        "max_new_tokens": 4,
        "max_length": 256,
        "lr": 1e-3,
        **EXACT,
    }
    result = instruct.train(load_config("instruct", overrides=overrides))
    folder = result.adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if method == "full":
        plain = AutoModelForCausalLM.from_pretrained(folder)
    else:
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), folder)
    assert torch.allclose(_logits(plain, tokenizer, TEXTS), _logits(result.model, tokenizer, TEXTS), atol=1e-5)
    assert set(result.manifest.metrics) >= {"test", "test_base"}  # the untuned base scored, also for full
    answers = instruct.respond(folder, [{"instruction": "Name the capital of France."}])
    assert answers[0].new_tokens <= 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "full", "quantize": "4bit"}, "`method` full cannot train a quantised base"),
        ({"method": "vera", "quantize": "8bit"}, "PEFT has no quantised layers"),
        ({"method": "ia3", "use_rslora": True}, "`use_rslora` applies to lora and dora, not to `method` ia3"),
        ({"method": "vera", "init_lora_weights": "pissa"}, "applies to lora and dora"),
        ({"method": "full", "target_modules": ["c_attn"]}, "trains every weight"),
        ({"init_lora_weights": "pissa", "quantize": "4bit"}, "leave `quantize` unset"),
        ({"method": "dora", "init_lora_weights": "olora"}, "PEFT cannot convert the result to plain LoRA"),
        pytest.param(
            {"init_lora_weights": "loftq"},
            "LoftQ quantises on a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU runs LoftQ"),
        ),
    ],
)
def test_impossible_combinations_are_refused_before_loading(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        methods.check(load_config("spam", overrides={"model": "gpt2"} | overrides))


def test_refusals_through_the_cli(tiny_gpt2: Path, spam_data: Path, tmp_path: Path):
    common = ["--model", str(tiny_gpt2), "--data", str(spam_data), "--output", str(tmp_path / "x")]
    olora = run_cli("spam", *common, "--init-lora-weights", "olora", "--max-steps", "1")
    assert olora.returncode == 2 and "Traceback" not in olora.stderr
    assert olora.stderr.strip().splitlines()[-1].startswith("error: --init-lora-weights olora: PEFT cannot start")
    assert not (tmp_path / "x").exists()
