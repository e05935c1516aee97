"""Merge and export: trained spam and instruct adapters folded into a small random-weight GPT-2 (real tokenizer),
loaded back with plain transformers; what merge refuses; the `adapters` and `inspect` commands."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_ft import cli, data
from lora_ft.core.errors import UserError
from lora_ft.engine import adapters
from lora_ft.export import merge
from lora_ft.tasks import classify, instruct

from .conftest import PAIRS, make_tiny_gpt2, run_cli, tree_sha256

TEXTS = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now",
    "see you at 5",
    "Ok lar... Joking wif u oni...",
]
PROMPTS = [data.format_prompt(i, x) for i, x, _ in PAIRS]

# What a user elsewhere runs: transformers' pipelines on the exported folders. It also reports whether peft or
# lora_ft got imported on the way (they must not be).
PLAIN = """
import json, sys
from transformers import pipeline
spam_dir, instruct_dir, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
classify = pipeline("text-classification", model=spam_dir)
generate = pipeline("text-generation", model=instruct_dir)
answers = generate(request["prompts"], max_new_tokens=24, do_sample=False, return_full_text=False)
print(json.dumps({
    "labels": [r["label"] for r in classify(request["texts"])],
    "responses": [a[0]["generated_text"] for a in answers],
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "lora_ft")),
}))
"""


@pytest.fixture(scope="module")
def spam_export(spam_run, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    result, _ = spam_run
    before = tree_sha256(result.adapter_dir), tree_sha256(tiny_gpt2)
    exported = merge.merge(result.adapter_dir, tmp_path_factory.mktemp("exports") / "spam")
    return exported, before


@pytest.fixture(scope="module")
def instruct_export(instruct_run, tmp_path_factory: pytest.TempPathFactory):
    result, _ = instruct_run
    return merge.merge(result.adapter_dir, tmp_path_factory.mktemp("exports") / "instruct")


def logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_spam_export_folder_and_manifest(spam_export, spam_run, tiny_gpt2: Path):
    exported, (adapter_before, base_before) = spam_export
    result, _ = spam_run
    names = {f.name for f in exported.output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "lora_ft.json"} == names
    config = json.loads((exported.output / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["pad_token_id"] == 50256 and config["architectures"] == ["GPT2ForSequenceClassification"]
    manifest = json.loads((exported.output / "lora_ft.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "merge"} == result.manifest
    section = manifest["merge"]
    assert section["dtype"] == "float32" and section["base_mismatches_forced"] == []
    assert section["base"]["weights_sha256"] == result.manifest["base"]["weights_sha256"]
    check = section["check"]
    assert check["examples"] == 8 and "SMSSpamCollection" in check["inputs"]
    assert 0 <= check["max_abs_logit_diff_float32"] <= 1e-4 and check["arithmetic"] == "float64"
    assert 0 <= check["max_abs_logit_diff_float32_run_in_float32"] <= 1e-4
    # Neither the adapter nor the base was touched.
    assert (tree_sha256(result.adapter_dir), tree_sha256(tiny_gpt2)) == (adapter_before, base_before)
    assert not list(exported.output.parent.glob(".*"))


def test_spam_export_logits_match_base_plus_adapter(spam_export, spam_run):
    exported, _ = spam_export
    result, _ = spam_run
    loaded = classify.load(result.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(exported.output)
    model = AutoModelForSequenceClassification.from_pretrained(exported.output).eval()
    assert not isinstance(model, PeftModel)
    difference = (logits(model, tokenizer, TEXTS) - logits(loaded.model, loaded.tokenizer, TEXTS)).abs().max()
    assert difference <= 1e-4


def test_instruct_export_logits_match_base_plus_adapter(instruct_export, instruct_run):
    result, _ = instruct_run
    loaded = instruct.load(result.adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(instruct_export.output).eval()
    texts = [p + o for p, (_, _, o) in zip(PROMPTS, PAIRS, strict=True)]
    tokenizer = AutoTokenizer.from_pretrained(instruct_export.output)
    difference = (logits(model, tokenizer, texts) - logits(loaded.model, loaded.tokenizer, texts)).abs().max()
    assert difference <= 1e-4
    assert instruct_export.manifest["merge"]["check"]["max_abs_logit_diff_float32"] <= 1e-4
    assert json.loads((instruct_export.output / "generation_config.json").read_text())["pad_token_id"] == 50256


def test_pipelines_on_exports_need_neither_lora_ft_nor_peft(spam_export, spam_run, instruct_export, instruct_run):
    """text-classification prints the label names and agrees with `predict`; text-generation, greedy, gives
    exactly what `generate` gives for the same instructions."""
    exported, _ = spam_export
    request = json.dumps({"texts": TEXTS, "prompts": PROMPTS})
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(exported.output), str(instruct_export.output), request],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["imported"] == []
    spam_result, _ = spam_run
    assert out["labels"] == [p.label for p in classify.predict(spam_result.adapter_dir, TEXTS)]
    assert set(out["labels"]) <= {"ham", "spam"}
    instruct_result, _ = instruct_run
    answers = instruct.respond(instruct_result.adapter_dir, [{"instruction": i, "input": x} for i, x, _ in PAIRS])
    assert [r.strip() for r in out["responses"]] == [a.response for a in answers] == [o for _, _, o in PAIRS]


def test_half_precision_export_from_the_command_line(instruct_run, tmp_path: Path):
    result, _ = instruct_run
    output = tmp_path / "bf16"
    done = run_cli("merge", str(result.adapter_dir), "--output", str(output), "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert f"-> {output} (bfloat16)" in done.stdout and "AutoModelForCausalLM" in done.stdout
    with safe_open(output / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert AutoModelForCausalLM.from_pretrained(output).dtype == torch.bfloat16
    section = json.loads((output / "lora_ft.json").read_text())["merge"]
    assert section["dtype"] == "bfloat16"
    check = section["check"]
    assert check["max_abs_logit_diff_float32"] <= 1e-4
    # The export's own figure is against base + adapter run in bfloat16; both are recorded, neither is zero.
    assert 0 < check["max_abs_logit_diff"] < 1 and 0 < check["max_abs_logit_diff_vs_float32"] < 1


def main(*args: str) -> int:
    return cli.main([str(a) for a in args])


def test_existing_output_is_refused_then_replaced_with_overwrite(spam_export, spam_run, tmp_path: Path, capsys):
    result, _ = spam_run
    output = tmp_path / "taken"
    shutil.copytree(spam_export[0].output, output)
    before = tree_sha256(output)
    assert main("merge", result.adapter_dir, "--output", output) == 2
    assert f"{output}: already exists" in capsys.readouterr().err
    assert tree_sha256(output) == before
    assert main("merge", result.adapter_dir, "--output", output, "--overwrite") == 0
    merged = json.loads((output / "lora_ft.json").read_text())["merge"]
    assert merged["created"] >= spam_export[0].manifest["merge"]["created"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_may_not_overlap_the_adapter_or_the_base(spam_run, tiny_gpt2: Path, capsys):
    result, _ = spam_run
    for output, what in ((result.adapter_dir, "the adapter"), (tiny_gpt2 / "merged", "the base model")):
        assert main("merge", result.adapter_dir, "--output", output, "--overwrite") == 2
        assert f"overlaps {what}" in capsys.readouterr().err
    assert not (tiny_gpt2 / "merged").exists()


def test_wrong_base_is_refused_unless_forced(spam_run, tmp_path: Path, capsys):
    result, _ = spam_run
    other_weights = make_tiny_gpt2(tmp_path / "other", seed=1)
    assert main("merge", result.adapter_dir, "--output", tmp_path / "a", "--base", other_weights) == 2
    err = capsys.readouterr().err
    assert f"{other_weights} is not the base it was trained on (weights sha256" in err and "--force" in err
    assert "Traceback" not in err and not (tmp_path / "a").exists()

    from transformers import GPT2Config, GPT2LMHeadModel

    narrower = tmp_path / "narrow"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256)).save_pretrained(narrower)
    assert main("merge", result.adapter_dir, "--output", tmp_path / "b", "--base", narrower) == 2
    assert "hidden size 32, adapter trained on 64" in capsys.readouterr().err
    assert main("merge", result.adapter_dir, "--output", tmp_path / "b", "--base", narrower, "--force") == 2
    assert "its weights do not fit" in capsys.readouterr().err and not (tmp_path / "b").exists()

    assert main("merge", result.adapter_dir, "--output", tmp_path / "c", "--base", other_weights, "--force") == 0
    assert "warning: --force: base differs" in capsys.readouterr().err
    section = json.loads((tmp_path / "c" / "lora_ft.json").read_text())["merge"]
    assert section["base"]["location"] == str(other_weights)
    assert "weights sha256" in section["base_mismatches_forced"][0]


def test_a_merged_export_is_not_an_adapter(spam_export, tmp_path: Path, capsys):
    assert main("merge", spam_export[0].output, "--output", tmp_path / "again") == 2
    assert "a merged export, not an adapter" in capsys.readouterr().err


def test_interrupted_merge_leaves_no_output(spam_run, tmp_path: Path, monkeypatch):
    """Ctrl-C after the weights are written, before the manifest: no output folder, no temp folder."""
    result, _ = spam_run
    seen: list[str] = []

    def interrupt(folder: Path, manifest: dict) -> None:
        seen.extend(sorted(f.name for f in folder.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters, "write_manifest", interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge.merge(result.adapter_dir, tmp_path / "export")
    assert "model.safetensors" in seen  # it was stopped mid-write
    assert list(tmp_path.iterdir()) == []


def test_a_merge_that_changes_the_model_is_refused(spam_run, tmp_path: Path, monkeypatch):
    """The check compares against base + adapter: a merge that goes wrong is caught before anything is written."""
    result, _ = spam_run
    merge_and_unload = BaseTuner.merge_and_unload

    def broken(self, *args, **kwargs):
        model = merge_and_unload(self, *args, **kwargs)
        weight = model.transformer.h[0].attn.c_attn.weight
        with torch.no_grad():  # random, not constant: a constant shift cancels after GPT-2's layer norm
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-2)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken)
    with pytest.raises(UserError, match=r"differ from base \+ adapter by up to .*nothing was written"):
        merge.merge(result.adapter_dir, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_a_merge_whose_logits_are_nan_is_refused(spam_run, tmp_path: Path, monkeypatch):
    """NaN is no difference to a comparison (NaN > tolerance is False): a merged model that gives NaN logits must
    still fail the check, and an adapter whose own weights give NaN is refused before its merge."""
    result, _ = spam_run
    merge_and_unload = BaseTuner.merge_and_unload

    def poisoned(self, *args, **kwargs):
        model = merge_and_unload(self, *args, **kwargs)
        with torch.no_grad():
            model.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", poisoned)
    with pytest.raises(UserError, match=r"the merged model gives non-finite logits .*nothing was written"):
        merge.merge(result.adapter_dir, tmp_path / "export")
    monkeypatch.undo()

    adapter = tmp_path / "nan-adapter"
    shutil.copytree(result.adapter_dir, adapter)
    weights = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    safetensors.torch.save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"base \+ adapter gives non-finite logits"):
        merge.merge(adapter, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan-adapter"]


def test_adapters_lists_adapters_and_exports(spam_run, instruct_run, spam_export, tmp_path: Path, capsys):
    root = tmp_path / "adapters"
    shutil.copytree(spam_run[0].adapter_dir, root / "spam-tiny")
    shutil.copytree(instruct_run[0].adapter_dir, root / "runs" / "instruct-tiny")
    shutil.copytree(spam_export[0].output, root / "exported")
    (root / "broken").mkdir()
    (root / "broken" / "lora_ft.json").write_text("{")
    shutil.copytree(spam_run[0].adapter_dir, root / ".spam.tmp-1-2")  # a write in progress is not listed

    assert main("adapters", root, "--json") == 0
    listed = {Path(e["path"]).name: e for e in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"spam-tiny", "instruct-tiny", "exported", "broken"}
    spam_row, instruct_row = listed["spam-tiny"], listed["instruct-tiny"]
    assert (spam_row["kind"], spam_row["task"], spam_row["base"]) == ("adapter", "spam", "gpt2")
    assert spam_row["metric"] == "accuracy"
    assert spam_row["value"] == spam_run[0].manifest["metrics"]["test"]["accuracy"]
    assert spam_row["size_bytes"] == sum(f.stat().st_size for f in (root / "spam-tiny").iterdir())
    assert (instruct_row["task"], instruct_row["metric"], instruct_row["value"]) == ("instruct", "rouge_l", 1.0)
    assert (listed["exported"]["kind"], listed["exported"]["created"]) == (
        "merged",
        spam_export[0].manifest["merge"]["created"],
    )
    assert "broken/lora_ft.json: not valid JSON" in listed["broken"]["problem"]

    assert main("adapters", root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        *("path", "kind", "task", "method", "base", "created", "(UTC)", "test", "metric", "95%", "CI", "size")
    ]
    row = next(line for line in lines if "spam-tiny" in line)
    assert f"accuracy {spam_row['value']:.4f}" in row and "adapter" in row
    assert any(line.startswith("unreadable: ") and "broken" in line for line in lines)

    assert main("adapters", tmp_path / "missing") == 2
    assert "missing: folder not found" in capsys.readouterr().err


def test_inspect_shows_the_manifest(spam_run, capsys):
    result, _ = spam_run
    assert main("inspect", result.adapter_dir) == 0
    out = capsys.readouterr().out
    accuracy = result.manifest["metrics"]["test"]["accuracy"]
    assert out.startswith(f"{result.adapter_dir}: spam adapter (lora), ")
    for line in ("  lora_r: 16", f"    accuracy: {accuracy:.4g}", "  max_steps: 60", "  transformers: ", "files:"):
        assert line in out
    assert "adapter_model.safetensors" in out and "log_history: " in out
    assert main("inspect", result.adapter_dir, "--json") == 0
    assert json.loads(capsys.readouterr().out) == result.manifest


def test_inspect_refuses_a_folder_without_a_manifest(tiny_gpt2: Path, capsys):
    assert main("inspect", tiny_gpt2) == 2
    assert f"{tiny_gpt2}: not a lora_ft adapter folder (no lora_ft.json)" in capsys.readouterr().err


def test_predict_refuses_a_changed_base_unless_forced(spam_run, tmp_path: Path, capsys):
    """The manifest records the base's weights hash; an adapter whose base has changed since is refused."""
    adapter = tmp_path / "adapter"
    shutil.copytree(spam_run[0].adapter_dir, adapter)
    manifest = json.loads((adapter / "lora_ft.json").read_text())
    manifest["base"]["weights_sha256"] = "0" * 64
    (adapter / "lora_ft.json").write_text(json.dumps(manifest))
    assert main("predict", adapter, "see you at 5") == 2
    assert "weights sha256" in capsys.readouterr().err
    assert main("predict", adapter, "see you at 5", "--force") == 0
    assert capsys.readouterr().out.split("\t")[0] in {"ham", "spam"}
