"""The bf16 path (`--precision bf16`, what auto means on a CPU with AVX512-BF16 or AMX): the frozen base held in
bf16, the adapter and head trained in float32, attention chosen by the batch's width. These run on every machine:
where bf16 is not native it is emulated (slower, the same numerics), so tolerances here are bf16's, and no figure
depends on the CPU."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.core.config import load_config
from lora_ft.engine import hardware, models
from lora_ft.export import merge
from lora_ft.tasks import classify, instruct

from .conftest import write_examples

STEPS = 8


def _spam(tiny_gpt2: Path, folder: Path, precision: str):
    values = {"model": str(tiny_gpt2), "output": str(folder), "max_steps": STEPS, "precision": precision}
    values |= {"lr": 2e-3, "eval_batch_size": 64}
    return classify.train(load_config("spam", overrides=values))


@pytest.fixture(scope="module")
def runs(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same run (seed, data, steps) in float32 and in bf16."""
    folder = tmp_path_factory.mktemp("bf16")
    return _spam(tiny_gpt2, folder / "fp32", "fp32"), _spam(tiny_gpt2, folder / "bf16", "bf16")


def _losses(result) -> list[float]:
    return [entry["loss"] for entry in result.manifest["training"]["log_history"] if "loss" in entry]


def test_bf16_base_holds_bf16_weights_and_trains_float32_ones(runs):
    _, bf16 = runs
    model = bf16.model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    saved = load_file(bf16.adapter_dir / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}  # the adapter file stays float32
    assert any("score" in name for name in saved)  # the trained head too
    assert bf16.manifest["training"]["precision"] == "bf16"


def test_bf16_loss_tracks_the_float32_loss(runs):
    fp32, bf16 = runs
    ours, reference = _losses(bf16), _losses(fp32)
    assert len(ours) == len(reference) >= 4
    # bf16 keeps 8 bits of mantissa: a few steps of the same run stay within a few percent of float32's loss
    assert ours == pytest.approx(reference, rel=0.03)
    assert ours[0] == pytest.approx(reference[0], rel=0.01)
    val_fp32, val_bf16 = fp32.manifest["metrics"]["val"]["loss"], bf16.manifest["metrics"]["val"]["loss"]
    assert val_bf16 == pytest.approx(val_fp32, rel=0.03)


def test_bf16_adapter_reloads_onto_the_untouched_float32_base(runs, tiny_gpt2: Path):
    """Plain transformers + PEFT, float32 base from its folder: the labels lora_ft gave the test split while
    training, and logits within bf16's rounding."""
    _, bf16 = runs
    manifest = bf16.manifest
    texts = classify.check_texts(manifest, 40)
    recorded = classify.predict(bf16.adapter_dir, texts)  # as trained: bf16 base, the same numerics as training
    tokenizer = AutoTokenizer.from_pretrained(bf16.adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    plain = PeftModel.from_pretrained(base, bf16.adapter_dir).eval()
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        probabilities = torch.softmax(plain(**inputs).logits, -1)
    names = manifest.label_names
    labels = [names[i] for i in probabilities.argmax(-1).tolist()]
    agree = sum(a == b.label for a, b in zip(labels, recorded, strict=True))
    assert agree >= len(texts) - 1  # a score at 0.5 +- bf16's rounding may fall either side
    scores = probabilities.max(-1).values.tolist()
    assert scores == pytest.approx([p.score for p in recorded], abs=0.02)


def test_eval_recomputes_a_bf16_adapters_metrics(runs):
    _, bf16 = runs
    recomputed, manifest = classify.evaluate(bf16.adapter_dir)
    recorded = manifest["metrics"]["test"]
    assert recomputed["accuracy"] == recorded["accuracy"]
    assert recomputed["loss"] == pytest.approx(recorded["loss"], abs=1e-6)


def test_bf16_adapter_merges_into_the_float32_base(runs, tmp_path: Path):
    _, bf16 = runs
    exported = merge.merge(bf16.adapter_dir, tmp_path / "merged")
    assert exported.manifest["merge"]["check"]["max_abs_logit_diff_float32"] <= merge.TOLERANCE
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32


def test_bf16_instruct_adapter_merges_and_exports_gguf(tiny_gpt2: Path, tmp_path: Path):
    values = {
        "model": str(tiny_gpt2), "data": str(write_examples(tmp_path / "four.json")), "output": str(tmp_path / "a"),
        "max_steps": 4, "batch_size": 4, "lr": 1e-2, "max_length": 256, "max_new_tokens": 4, "precision": "bf16",
    }  # fmt: skip
    result = instruct.train(load_config("instruct", overrides=values))
    assert {p.dtype for p in result.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    records = json.loads((tmp_path / "a" / instruct.RESPONSES).read_text())
    answers = instruct.respond(tmp_path / "a", records)  # reloaded in bf16: the answers training recorded
    assert [a.response for a in answers] == [r["model_response"] for r in records]
    exported = merge.merge(result.adapter_dir, tmp_path / "merged", gguf="f32")
    assert exported.manifest["merge"]["check"]["max_abs_logit_diff_float32"] <= merge.TOLERANCE
    assert (tmp_path / "merged" / "merged.gguf").is_file()


def test_attention_follows_the_batch_width(tiny_gpt2: Path, monkeypatch):
    """Eager attention for short rows, SDPA for long ones, on the CPU; the same logits either way."""
    monkeypatch.setattr(hardware, "CPU_EAGER_ATTENTION_MAX_TOKENS", 8)
    source = models.ModelSource(str(tiny_gpt2), "local", str(tiny_gpt2))
    tokenizer = models.load_tokenizer(source)
    model = models.load_classifier_base(source, tokenizer, ["a", "b"]).eval()
    seen = []
    model.register_forward_hook(lambda module, *_: seen.append(module.config._attn_implementation))
    short, long = torch.randint(0, 1000, (2, 6)), torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        short_logits, long_logits = model(input_ids=short).logits, model(input_ids=long).logits
        model.config._attn_implementation = "sdpa"
        hardware.CPU_EAGER_ATTENTION_MAX_TOKENS = 10**6  # the hook now picks eager for both: compare kernels
        assert seen == ["eager", "sdpa"]
        torch.testing.assert_close(model(input_ids=long).logits, long_logits, atol=1e-5, rtol=1e-4)
        assert seen[-1] == "eager"
        torch.testing.assert_close(model(input_ids=short).logits, short_logits)


def test_native_bf16_can_be_forced_either_way(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "1")
    assert hardware.resolve_precision("auto") == "bf16"
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "0")
    assert hardware.resolve_precision("auto") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # asked for: emulated
