"""GGUF export (`merge --gguf`): instruct adapters on a tiny GPT-2 and a tiny Llama-style model, written at f32 and
q8_0, read back by transformers (as llama.cpp's own tools would find them: its tensor names, tokenizer inside),
compared with base + adapter; the Ollama Modelfile; what is refused; a corrupted file caught by the check."""

import json
import shutil
import threading
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

from lora_ft import data
from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError
from lora_ft.engine import gguf_reading
from lora_ft.export import gguf_export, merge
from lora_ft.tasks import instruct

from .conftest import EXACT, GPT2_TOKENIZER, PAIRS, run_cli, write_examples

PROMPTS = [data.format_prompt(i, x) for i, x, _ in PAIRS]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer Llama-style model (grouped-query attention: 4 heads, 2 key/value heads; tied embeddings, as
    SmolLM2) with random weights and GPT-2's tokenizer, and an instruct adapter trained on it for a few steps."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)
    out = tmp_path_factory.mktemp("adapters")
    overrides = {"model": str(folder), "data": str(write_examples(out / "four.json")), "output": str(out / "llama")}
    overrides |= {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "max_length": 256, "max_new_tokens": 8, **EXACT}
    return instruct.train(load_config("instruct", overrides=overrides))


@pytest.fixture(scope="module")
def exports(instruct_run, llama_run, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each family at f32 (with the adapter alone as a GGUF LoRA too) and q8_0; GPT-2 at q8_0 through the command
    line (and what it prints)."""
    adapters = {"gpt2": instruct_run[0].adapter_dir, "llama": llama_run.adapter_dir}
    folders = {}
    for arch, kind in [("gpt2", "f32"), ("gpt2", "q8_0"), ("llama", "f32"), ("llama", "q8_0")]:
        folder = folders[arch, kind] = tmp_path_factory.mktemp("gguf") / f"{arch}-{kind}"
        if (arch, kind) != ("gpt2", "q8_0"):
            merge.merge(adapters[arch], folder, gguf=kind, gguf_adapter=kind == "f32")
            continue
        done = run_cli("merge", str(adapters[arch]), "--output", str(folder), "--gguf", kind)
        assert done.returncode == 0, done.stderr
        assert f"GGUF (q8_0): {folder / (folder.name + '.gguf')}, read back: logits within" in done.stdout
        assert f"Ollama: cd {folder} && ollama create {folder.name} -f Modelfile" in done.stdout
    return folders


def _reference_logits(adapter: Path, texts: list[str]) -> tuple[torch.Tensor, dict]:
    loaded = instruct.load(adapter, full_precision=True)
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits[batch["attention_mask"].bool()], batch


@pytest.mark.parametrize(("arch", "kind"), [("gpt2", "f32"), ("gpt2", "q8_0"), ("llama", "f32"), ("llama", "q8_0")])
def test_export_reads_back_to_base_plus_adapter(exports, instruct_run, llama_run, arch: str, kind: str, monkeypatch):
    folder = exports[arch, kind]
    adapter = instruct_run[0].adapter_dir if arch == "gpt2" else llama_run.adapter_dir
    path = folder / f"{folder.name}.gguf"
    stored = json.loads((folder / "lora_ft.json").read_text())["merge"]["gguf"]
    assert stored["file"] == path.name and path.is_file()
    assert stored["type"] == kind and stored["check"]["tolerance_relative"] == gguf_export.TOLERANCE[kind]

    # llama.cpp's names and types, as its tools look for them
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == arch
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    first = "blk.0.attn_qkv.weight" if arch == "gpt2" else "blk.0.attn_q.weight"
    assert types[first] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    config = json.loads((folder / "config.json").read_text())  # older readers (llama.cpp's converter) need n_ctx
    assert arch != "gpt2" or config["n_ctx"] == config["n_positions"] == 256

    # read back independently of the check: the tokenizer gives the same ids, the logits are within tolerance (the
    # file parsed once for the tokenizer, the config and the weights, as merge's check reads it)
    parses = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, own=gguf.GGUFReader, **k: parses.append(a) or own(*a, **k))
    with gguf_reading.each_file_parsed_once():
        read_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        extra = {"n_positions": 256} if arch == "gpt2" else {}
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32, **extra)
    assert len(parses) == 1
    own = AutoTokenizer.from_pretrained(adapter)
    for prompt in PROMPTS:
        assert read_tokenizer(prompt)["input_ids"] == own(prompt)["input_ids"]
    reference, batch = _reference_logits(adapter, PROMPTS)
    with torch.no_grad():
        logits = model.eval()(**batch).logits[batch["attention_mask"].bool()]
    relative = float((logits - reference).abs().max() / reference.abs().max())
    assert relative <= gguf_export.TOLERANCE[kind]
    if kind == "f32":
        assert relative < 1e-5
        if arch == "gpt2":  # trained until its greedy answers are right: the GGUF gives the same answers
            answers = [a.response for a in instruct.generate(model, read_tokenizer, PROMPTS, 24)]
            assert answers == [o for _, _, o in PAIRS]

    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n")
    assert 'TEMPLATE """Below is an instruction' in modelfile and "### Instruction:\n{{ .Prompt }}" in modelfile
    assert modelfile.rstrip().endswith("PARAMETER temperature 0") and 'PARAMETER stop "<|endoftext|>"' in modelfile


def test_parsing_once_inside_another_shares_the_outer_parses(monkeypatch, tmp_path: Path):
    """A base load holds its own (config and weights), inside a run's that holds the tokenizer's too: the file is
    parsed once for all three, and each reader put back on the way out."""
    parses = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: parses.append(path) or object())
    counting = gguf.GGUFReader
    path = tmp_path / "m.gguf"
    with gguf_reading.each_file_parsed_once():
        tokenizer_read = gguf.GGUFReader(path)
        with gguf_reading.each_file_parsed_once():
            assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path)) is tokenizer_read
        assert gguf.GGUFReader(path) is tokenizer_read
    assert parses == [path] and gguf.GGUFReader is counting


def test_threads_parsing_once_at_the_same_time_leave_the_reader_as_it_was():
    """Two threads loading at once (serve, studio): the second waits for the first, so that neither puts back a
    reader that is the other's (the first ending first would leave the second's own memo in place for good)."""
    own, first_in, second_in, first_may_end, second_may_end = gguf.GGUFReader, *(threading.Event() for _ in range(4))

    def hold(entered: threading.Event, may_end: threading.Event) -> None:
        with gguf_reading.each_file_parsed_once():
            entered.set()
            may_end.wait(10)

    threads = [
        threading.Thread(target=hold, args=events)
        for events in ((first_in, first_may_end), (second_in, second_may_end))
    ]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert not second_in.wait(0.5)  # waits while the first reads
    first_may_end.set()
    assert second_in.wait(10)
    second_may_end.set()
    for thread in threads:
        thread.join(10)
    assert gguf.GGUFReader is own


def test_a_corrupted_file_is_caught(exports, instruct_run, tmp_path: Path):
    """Bytes of the tensor data overwritten (a bad disk, a writer bug): the read-back check refuses the file (the
    same check passed it whole inside `merge`, before the export was kept)."""
    folder = tmp_path / "corrupted"
    shutil.copytree(exports["gpt2", "f32"], folder)
    path = folder / "gpt2-f32.gguf"
    with path.open("r+b") as file:  # the last tensors' data: random bytes as float32
        file.seek(path.stat().st_size - 4096)
        file.write(torch.randn(1024, generator=torch.Generator().manual_seed(0)).numpy().astype("float32").tobytes())
    reference, batch = _reference_logits(instruct_run[0].adapter_dir, PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(instruct_run[0].adapter_dir)
    with pytest.raises(UserError, match=r"gpt2-f32.gguf: read back, its logits differ .*nothing was written"):
        gguf_export.check(path, batch, reference.double(), tokenizer, "f32", {"n_positions": 256})


def test_a_classifier_is_refused(spam_run, tmp_path: Path):
    result, _ = spam_run
    with pytest.raises(UserError, match=r"a spam adapter cannot be exported as GGUF: llama\.cpp runs language models"):
        merge.merge(result.adapter_dir, tmp_path / "out", gguf="f16")
    assert not (tmp_path / "out").exists()


def test_unknown_gguf_type_is_refused(instruct_run, tmp_path: Path):
    result, _ = instruct_run
    done = run_cli("merge", str(result.adapter_dir), "--output", str(tmp_path / "out"), "--gguf", "q4_k")
    assert done.returncode == 2 and "invalid choice: 'q4_k'" in done.stderr
    with pytest.raises(UserError, match="`gguf` must be one of f32, f16, bf16, q8_0, got 'q4_k'"):
        merge.merge(result.adapter_dir, tmp_path / "out", gguf="q4_k")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_alone_as_gguf_lora_applies_as_llama_cpp_does(exports, instruct_run, llama_run, arch: str):
    """`--gguf-adapter`: each A/B pair fits its weight as llama.cpp checks it (A [r, in], B [out, r] in llama.cpp's
    layout), and the merged GGUF's weight minus alpha / r * B A is the base's weight in that layout."""
    adapter = instruct_run[0].adapter_dir if arch == "gpt2" else llama_run.adapter_dir
    folder = exports[arch, "f32"]
    lora = gguf.GGUFReader(folder / f"{folder.name}.lora.gguf")
    assert lora.get_field("general.type").contents() == "adapter"
    assert lora.get_field("adapter.type").contents() == "lora"
    alpha = lora.get_field("adapter.lora.alpha").contents()
    merged = {t.name: t for t in gguf.GGUFReader(folder / f"{folder.name}.gguf").tensors}
    pairs = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in lora.tensors}
    assert pairs and len(pairs) % 2 == 0

    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "lora_ft.json").read_text())["base"]["location"])
    family = gguf_export.family(arch)
    names = gguf.get_tensor_name_map(family.arch, 2)
    hf_names = {names.get_name(n.removesuffix(".weight")): n for n in base.state_dict() if n.endswith(".weight")}
    for name in {n.rsplit(".", 1)[0] for n in pairs}:  # blk.N.xxx.weight
        a, b = pairs[f"{name}.lora_a"], pairs[f"{name}.lora_b"]
        weight = gguf.quants.dequantize(merged[name].data, merged[name].tensor_type)
        assert a.shape[1] == weight.shape[1] and b.shape[0] == weight.shape[0] and a.shape[0] == b.shape[1]
        hf_name = hf_names[name.removesuffix(".weight")]
        own = family.tensor(hf_name, base.state_dict()[hf_name].float().numpy(), base.config)
        assert abs(weight - alpha / a.shape[0] * (b @ a) - own).max() < 1e-5, name


def test_tokenizer_of_transformers_5s_generic_class_is_saved_for_older_readers(instruct_run, tmp_path: Path):
    """A tokenizer of transformers 5's generic class (what a tokenizer read from a GGUF file, as SmolLM2's base is,
    gets), which 4.x and llama.cpp's converter cannot load: saved by lora_ft it names the fast generic class and
    keeps its chat template inside tokenizer_config.json too."""
    import transformers

    from lora_ft.engine import adapters

    own = AutoTokenizer.from_pretrained(instruct_run[0].adapter_dir)
    tokenizer = transformers.TokenizersBackend(tokenizer_object=own.backend_tokenizer, eos_token=own.eos_token)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

    class Saved:  # what save_adapter asks of a model
        def save_pretrained(self, path, state_dict=None):
            Path(path).mkdir(parents=True, exist_ok=True)

    adapters.save_adapter(Saved(), tokenizer, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == tokenizer.chat_template
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert again(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]
