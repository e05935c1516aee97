"""Precision, token accounting, QLoRA (bitsandbytes 4- and 8-bit on the CPU) and the benchmark, on a small
random-weight GPT-2 with the real tokenizer."""

import json
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_ft import data
from lora_ft.bench import inference, speed
from lora_ft.core import report as lora_report
from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError
from lora_ft.engine import hardware, models, training
from lora_ft.export import merge
from lora_ft.tasks import classify, instruct

from .conftest import EXACT, GPT2_TOKENIZER, PAIRS, tree_sha256, write_examples

ROWS = [
    ("the meeting moved to 3pm", "work"),
    ("dinner at mum's on sunday? bring the kids and the dog if you can, we will be in the garden all day", "family"),
    ("your invoice #442 is attached", "work"),
    ("happy birthday sis!!", "family"),
    ("quarterly report due friday, please send your numbers to finance before noon so they can close", "work"),
    ("grandma says hi", "family"),
] * 8


def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # asked for: emulated, slower, but allowed
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        hardware.resolve_precision("fp16")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: False)
    assert hardware.resolve_precision("auto") == "fp16"
    with pytest.raises(UserError, match="Tesla T4 has no bf16"):
        hardware.resolve_precision("bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    assert hardware.resolve_precision("auto") == "bf16"


def test_bad_precision_or_quantize_in_a_recipe(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("precision: fp8\n")
    with pytest.raises(UserError, match=f"{recipe}: 'precision' must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        load_config("spam", recipe)
    recipe.write_text("quantize: 3bit\n")
    with pytest.raises(UserError, match="'quantize' must be null or one of 4bit, 8bit, got '3bit'"):
        load_config("spam", recipe)


def _train_mail(tiny_gpt2: Path, folder: Path, recipe: Path | None = None, **overrides):
    folder.parent.mkdir(parents=True, exist_ok=True)
    csv_path = folder.parent / "mail.csv"
    csv_path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in ROWS))
    values = {"model": str(tiny_gpt2), "data": str(csv_path), "output": str(folder), "epochs": 1.0}
    values |= EXACT | overrides
    return classify.train(load_config("spam", recipe, overrides=values))


def _adapter_weights(result: training.TrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _assert_same_adapter(result: training.TrainResult, expected: training.TrainResult, **tolerance) -> dict:
    """The two runs saved the same LoRA weights under the same names (`tolerance`: assert_close's rtol/atol);
    returns `result`'s weights."""
    weights, wanted = _adapter_weights(result), _adapter_weights(expected)
    assert weights.keys() == wanted.keys()
    for name in wanted:
        torch.testing.assert_close(weights[name], wanted[name], **tolerance)
    return weights


def test_bf16_run_is_recorded_and_tokens_are_counted(tiny_gpt2: Path, tmp_path: Path):
    fp32 = _train_mail(tiny_gpt2, tmp_path / "fp32" / "a", precision="fp32")
    bf16 = _train_mail(tiny_gpt2, tmp_path / "bf16" / "a", precision="bf16")
    assert fp32.manifest["training"]["precision"] == "fp32"
    assert bf16.manifest["training"]["precision"] == "bf16" and bf16.manifest["config"]["precision"] == "bf16"

    # One epoch sees every training example once: the real tokens counted are exactly theirs.
    tokenizer = AutoTokenizer.from_pretrained(fp32.adapter_dir)
    _, splits = classify.load_splits(load_config("spam", overrides={"data": fp32.manifest["data"]["path"]}))
    real = sum(len(tokenizer(t)["input_ids"]) for t in splits["train"]["text"])
    for result in (fp32, bf16):
        tokens = result.manifest["training"]["tokens"]
        assert tokens["real"] == real
        # Long and short rows are mixed; on a split this small Trainer's length grouping has one batch per group.
        assert real < tokens["with_padding"]
        assert tokens["real_share"] == round(real / tokens["with_padding"], 4)

    # Same seed, same data, same batches: only the arithmetic differs, a little.
    a, b = (_adapter_weights(r) for r in (fp32, bf16))
    differences = [(a[k] - b[k]).abs().max().item() for k in a]
    assert 0 < max(differences) < 0.05


@pytest.fixture(scope="module")
def qlora_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    before = tree_sha256(tiny_gpt2)
    output = tmp_path_factory.mktemp("qlora") / "spam-4bit"
    values = {"model": str(tiny_gpt2), "output": str(output), "max_steps": 60, "quantize": "4bit", **EXACT}
    return classify.train(load_config("spam", overrides=values)), before


def test_qlora_trains_on_a_4bit_base_and_saves_only_the_adapter(qlora_run, tiny_gpt2: Path):
    result, before = qlora_run
    layers = result.model.base_model.model.transformer.h[0]
    assert isinstance(layers.attn.c_attn.base_layer, bnb.nn.Linear4bit)  # GPT-2's Conv1D, quantised
    assert layers.attn.c_attn.base_layer.weight.quant_type == "nf4"
    assert not isinstance(result.model.base_model.model.score.modules_to_save["default"], bnb.nn.Linear4bit)
    assert result.manifest["config"]["quantize"] == "4bit"
    assert result.manifest["lora"]["fan_in_fan_out"] is False  # bnb layers hold weights as nn.Linear does
    assert result.manifest["metrics"]["test"]["accuracy"] > 0.6  # as test_spam asks of float32 LoRA
    assert tree_sha256(tiny_gpt2) == before
    assert {f.name for f in result.adapter_dir.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}


def test_qlora_adapter_is_evaluated_on_its_4bit_base(qlora_run):
    result, _ = qlora_run
    recomputed, manifest = classify.evaluate(result.adapter_dir)
    assert recomputed["accuracy"] == manifest["metrics"]["test"]["accuracy"]
    # bitsandbytes' 4-bit CPU kernels do not give the same bits call after call on every CPU (2e-5 apart on an AMX
    # Xeon, float32 arithmetic): the same labels, a loss within 1e-4
    assert recomputed["loss"] == pytest.approx(manifest["metrics"]["test"]["loss"], abs=1e-4)
    loaded = classify.load(result.adapter_dir)
    assert isinstance(loaded.model.base_model.model.transformer.h[0].mlp.c_fc.base_layer, bnb.nn.Linear4bit)


def test_qlora_adapter_merges_into_the_full_precision_base(qlora_run, tmp_path: Path):
    result, _ = qlora_run
    exported = merge.merge(result.adapter_dir, tmp_path / "merged")
    check = exported.manifest["merge"]["check"]
    assert check["max_abs_logit_diff_float32"] <= merge.TOLERANCE
    assert 0 < check["max_abs_logit_diff_vs_4bit_base"] < 1.0  # quantisation error, recorded, not hidden
    assert exported.manifest["merge"]["adapter_trained_with_quantization"] == "4bit"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32


def test_8bit_spam_and_4bit_instruct(tiny_gpt2: Path, tmp_path: Path):
    values = {"model": str(tiny_gpt2), "output": str(tmp_path / "s8"), "max_steps": 4, "quantize": "8bit"}
    classify.train(load_config("spam", overrides=values))
    recomputed, manifest = classify.evaluate(tmp_path / "s8")
    assert manifest["config"]["quantize"] == "8bit"
    assert recomputed["accuracy"] == manifest["metrics"]["test"]["accuracy"]

    values = {
        "model": str(tiny_gpt2), "output": str(tmp_path / "i4"), "max_steps": 4, "quantize": "4bit",
        "test_limit": 3, "max_new_tokens": 6, "max_length": 256,
    }  # fmt: skip
    result = instruct.train(load_config("instruct", overrides=values))
    records = json.loads((tmp_path / "i4" / instruct.RESPONSES).read_text())
    answers = instruct.respond(tmp_path / "i4", records)
    assert [a.response for a in answers] == [r["model_response"] for r in records]
    assert result.manifest["training"]["tokens"]["real"] > 0


def test_quantize_refuses_a_gguf_model(tiny_gpt2: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    gguf = models.ModelSource("smollm2-135m", "gguf", str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(UserError, match="smollm2-135m is a GGUF checkpoint"):
        models.load_classifier_base(gguf, tokenizer, ["ham", "spam"], "4bit")


def test_seconds_per_epoch_fit():
    tokens = [400, 300, 200, 100]
    durations = [0.1 + 0.001 * t for t in tokens]  # 0.1 s per step plus 1 ms per token
    epoch = [50] * 10 + [250] * 10
    assert speed.seconds_per_epoch(durations, tokens, epoch) == pytest.approx(20 * 0.1 + 0.001 * 3000)
    assert speed.seconds_per_epoch([2.0, 2.2], [960, 960], [960] * 5) == pytest.approx(10.5)


SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 2}


def _check_bench_report(report: dict) -> None:
    """What the benchmark's report must hold: the naive path at the course's width, the same steps, lora_ft's ratios
    to every other setup from their own figures, the MFU from the measured peak, one table row per setup."""
    lora_ft, naive, full = (report["setups"][name] for name in ("lora_ft", "naive", "full"))
    assert naive["pad_to"] == 120 and naive["padded_tokens_per_epoch"] == 1045 * 120  # the course's width
    assert lora_ft["real_token_share"] > 0.75 > naive["real_token_share"]
    assert lora_ft["steps_per_epoch"] == naive["steps_per_epoch"] == 131
    assert full["trainable_parameters"] > 100 * lora_ft["trainable_parameters"]
    assert 1.0 < full["flops_per_padded_token"] / lora_ft["flops_per_padded_token"] <= 1.5
    assert report["speedup_vs_naive"] == naive["seconds_per_epoch"] / lora_ft["seconds_per_epoch"]
    course = report["setups"]["course"]  # the course's own code, installed with `pip install --no-deps`
    assert report["speedup_vs_course"] == course["seconds_per_epoch"] / lora_ft["seconds_per_epoch"]
    assert course["steps_per_epoch"] == 1045 // 8 and course["batch_size"] == 8 and course["lora_rank"] == 16
    peaks = report["machine"]["matmul_peak_gflops_per_second"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    model_gflops = lora_ft["flops_per_padded_token"] * lora_ft["real_tokens_per_epoch"] / lora_ft["seconds_per_epoch"]
    assert report["mfu"] == lora_ft["mfu"] == pytest.approx(model_gflops / 1e9 / peaks[lora_ft["precision_run"]])
    assert np.isfinite(report["peak_rss_ratio_lora_vs_full"]) and report["peak_rss_ratio_lora_vs_full"] > 0
    table = lora_report.bench_table(report).splitlines()
    rows = ["setup", "lora_ft", "naive", "full", "lora_ckpt", "lora_compile", "course"]
    assert [line.split()[0] for line in table] == rows
    ckpt = report["setups"]["lora_ckpt"]
    assert report["checkpointing_time_ratio"] == ckpt["seconds_per_epoch"] / lora_ft["seconds_per_epoch"]
    assert f"{naive['seconds_per_epoch']:.1f}" in table[2]
    compiled = report["setups"]["lora_compile"]
    assert report["compile_speedup"] == lora_ft["seconds_per_epoch"] / compiled["seconds_per_epoch"]
    assert compiled["warmup_seconds"] > 0


@pytest.mark.slow
def test_bench_end_to_end_on_a_small_gpt2():
    """The whole benchmark (every setup, each in its own process) on a 2-layer GPT-2, a few timed steps each (about
    a minute of CPU, most of it seven processes importing torch: under -m slow)."""
    report = speed.run(quick=True, tokenizer=str(GPT2_TOKENIZER), architecture=SMALL)
    _check_bench_report(report)
    assert report["setups"]["lora_compile"]["compile"]


def test_bench_report_on_setups_measured_in_this_process():
    """The benchmark's report, as `bench` assembles it, on every setup measured here (`bench` runs each in its own
    process: the slow test above) on a 2-layer GPT-2, one warm-up and two timed steps each. The compiled setup runs
    uncompiled here: inductor's first compile on a fresh machine takes most of a minute (the slow test compiles it,
    and test_compiled_blocks_train_the_same_adapter checks --compile's training)."""
    tokenizer = str(GPT2_TOKENIZER)
    results = {
        setup.name: speed.measure(
            replace(setup, warmup_steps=1, timed_steps=2, compile=False), tokenizer, None, 123, SMALL
        )
        for setup in speed.setups(True)
    }
    results["course"] = speed.measure_course(True, tokenizer, None, 123, SMALL)
    peaks = speed.matmul_peaks(speed.bench_config("gpt2", speed.load_tokenizer(tokenizer), SMALL))
    _check_bench_report(speed.summarise(results, peaks, {"quick": True, "task": "spam"}, None))


def test_bench_measures_instruct_training(tmp_path: Path):
    """`bench --task instruct`'s setups measure SFT steps: rows masked as SFTTrainer masks them, the naive path padded
    to the longest example (in this process, two timed steps each: the structure, not the speed)."""
    four = write_examples(tmp_path / "four.json")
    lora_ft, naive = [
        speed.measure(replace(s, warmup_steps=1, timed_steps=2), str(GPT2_TOKENIZER), str(four), 123, SMALL, "instruct")
        for s in speed.setups(True, "instruct")[:2]
    ]
    assert lora_ft["task"] == "instruct" and lora_ft["steps_per_epoch"] == naive["steps_per_epoch"] == 3  # 17 rows
    tok = speed.load_tokenizer(str(GPT2_TOKENIZER))
    longest = max(len(instruct.encode(tok, data.format_prompt(i, x), o + tok.eos_token)[0]) for i, x, o in PAIRS)
    assert naive["pad_to"] == longest and naive["padded_tokens_per_epoch"] == 17 * longest
    assert lora_ft["real_tokens_per_epoch"] == naive["real_tokens_per_epoch"] < naive["padded_tokens_per_epoch"]
    assert lora_ft["flops_per_padded_token"] > 0 and lora_ft["lora_dropout"] == 0.05  # instruct's recipe
    # SFTTrainer's fused LM head projects only the labelled positions; the naive path computes every position's
    # logits (the tiny model's 50,257 x 64 head outweighs its blocks)
    assert lora_ft["flops_per_padded_token"] < 0.8 * naive["flops_per_padded_token"]


def test_bench_builds_smollm2s_architecture():
    """`bench --model smollm2-135m`: SmolLM2's architecture with random weights (a narrow one here), LoRA on its
    seven projections, the vocabulary the tokenizer's."""
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    setup = replace(speed.setups(True)[0], warmup_steps=1, timed_steps=2)
    result = speed.measure(
        setup, str(GPT2_TOKENIZER), None, 123, tiny | {"num_key_value_heads": 2}, "spam", "smollm2-135m"
    )
    assert result["bench_model"] == "smollm2-135m" and result["steps_timed"] == 2
    per_layer = 2 * 16 * (64 + 64) + 2 * 16 * (64 + 32) + 16 * (64 + 128) * 3  # q, o; k, v; gate, up, down (r 16)
    assert result["trainable_parameters"] == 2 * per_layer + 64 * 2  # and the 2-label head
    config = speed.bench_config("smollm2-135m", speed.load_tokenizer(str(GPT2_TOKENIZER)), None)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 50257)
    with pytest.raises(UserError, match="bench builds gpt2, smollm2-135m"):
        speed.bench_config("llama-7b", speed.load_tokenizer(str(GPT2_TOKENIZER)), None)


def _dropout_rates(model: torch.nn.Module) -> tuple[set[float], set[float]]:
    """The rates of the base model's own dropout modules, and of LoRA's (PEFT puts an Identity where it is 0)."""
    rates: tuple[set[float], set[float]] = (set(), set())
    for name, module in model.named_modules():
        lora = ".lora_dropout." in name
        if isinstance(module, torch.nn.Dropout) or (lora and isinstance(module, torch.nn.Identity)):
            rates[lora].add(getattr(module, "p", 0.0))
    return rates


@pytest.mark.parametrize(
    ("overrides", "model_rate", "lora_rate"),
    [({}, 0.0, 0.0), ({"model_dropout": 0.2, "lora_dropout": 0.1}, 0.2, 0.1), ({"model_dropout": "null"}, 0.1, 0.0)],
    ids=["defaults-off", "set", "as-shipped"],
)
def test_dropout_settings_reach_the_model(tiny_gpt2: Path, tmp_path: Path, overrides, model_rate, lora_rate):
    recipe = tmp_path / "recipe.yaml"  # null (as shipped) can be said in a recipe, not as a flag
    recipe.write_text("".join(f"{key}: {value}\n" for key, value in overrides.items()))
    result = _train_mail(tiny_gpt2, tmp_path / "run" / "a", max_steps=1, recipe=recipe)
    assert _dropout_rates(result.model) == ({model_rate}, {lora_rate})
    assert result.model.get_base_model().config.resid_pdrop == model_rate  # GPT-2 ships 0.1
    assert result.manifest["config"]["model_dropout"] == (None if model_rate == 0.1 else model_rate)


def test_activation_checkpointing_trains_the_same_adapter(tiny_gpt2: Path, tmp_path: Path):
    """Recomputing activations in backward changes memory and time, not the result: the gradients reach the LoRA
    weights (the frozen blocks' inputs need none) and give the same adapter."""
    plain = _train_mail(tiny_gpt2, tmp_path / "plain" / "a", max_steps=3)
    saved = _train_mail(tiny_gpt2, tmp_path / "ckpt" / "a", max_steps=3, activation_checkpointing=True)
    assert saved.manifest["config"]["activation_checkpointing"] is True
    weights = _assert_same_adapter(saved, plain, rtol=1e-4, atol=1e-6)
    initial = _train_mail(tiny_gpt2, tmp_path / "none" / "a", max_steps=1, lr=1e-12)  # barely moved from the init
    moved = _adapter_weights(initial)
    assert any(not torch.allclose(weights[name], moved[name]) for name in weights if "lora_B" in name)


def test_compiled_blocks_train_the_same_adapter(tiny_gpt2: Path, tmp_path: Path, caplog):
    """--compile changes how the blocks run, not what they compute: the same adapter within float32 rounding
    (inductor fuses and reorders element-wise work), the blocks compiled in place (the adapter's names unchanged)."""
    plain = _train_mail(tiny_gpt2, tmp_path / "plain" / "a", max_steps=3)
    with caplog.at_level("WARNING", logger="lora_ft"):
        compiled = _train_mail(tiny_gpt2, tmp_path / "compiled" / "a", max_steps=3, compile=True)
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()]  # compiled, not fallen back
    assert compiled.manifest["config"]["compile"] is True
    _assert_same_adapter(compiled, plain, rtol=1e-3, atol=1e-5)
    assert compiled.manifest["metrics"]["test"]["accuracy"] == plain.manifest["metrics"]["test"]["accuracy"]


@pytest.mark.parametrize("failure", ["no C++ compiler", "no such backend"])
def test_a_failed_compile_falls_back_and_says_so_once(tiny_gpt2: Path, tmp_path: Path, monkeypatch, caplog, failure):
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    settings: dict = {"fx_graph_cache": False}  # nor read from inductor's cache on disk
    if failure == "no C++ compiler":  # what a machine without gcc/g++ gives inductor
        settings["cpp.cxx"] = (None, str(tmp_path / "no-g++"))
    else:
        monkeypatch.setattr(training, "COMPILER", "no_such_backend")
    plain = _train_mail(tiny_gpt2, tmp_path / "plain" / "a", max_steps=2)
    with caplog.at_level("WARNING", logger="lora_ft"), inductor.patch(settings):
        fallen = _train_mail(tiny_gpt2, tmp_path / "fallen" / "a", max_steps=2, compile=True)
    said = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(said) == 1 and "training without it" in said[0] and "\n" not in said[0]
    _assert_same_adapter(fallen, plain)


def test_inference_bench_on_a_small_gpt2():
    """`bench --inference`: lora_ft's batched predict and cached generate against one-at-a-time loops, on the real
    test messages and instructions; both give the same answers."""
    report = inference.run(quick=True, tokenizer=str(GPT2_TOKENIZER), architecture=SMALL)
    predict, generate = report["predict"], report["generate"]
    assert predict["texts"] == 64 and predict["same_labels"] == 1.0 and predict["max_logit_difference"] < 1e-4
    assert predict["speedup"] == pytest.approx(predict["texts_per_second"] / predict["naive_texts_per_second"])
    assert generate["prompts"] == 4 and 0 < generate["tokens"] <= 4 * 32 and generate["same_answers"] == 1.0
    assert generate["speedup"] == pytest.approx(generate["tokens_per_second"] / generate["naive_tokens_per_second"])
    summary = lora_report.inference_summary(report)
    assert f"{predict['texts_per_second']:.1f} texts/s" in summary and "same answers for 100% of 4" in summary
