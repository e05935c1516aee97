"""Slow (`pytest -m slow`, minutes of installs): lora_ft's outputs taken to other tools as they are. transformers
4.57 and peft 0.17 in their own venv load a merged GPT-2 export and the adapter; llama.cpp's own converter (from
the llama-cpp-python source distribution, which vendors llama.cpp) converts the export with no edits, to the same
tensors and tokenizer as `merge --gguf f32`; llama.cpp's programs, built with cmake, answer with the adapter's
answers from the merged GGUF (`llama-simple`) and from the base + the GGUF LoRA (`llama-completion --lora`), and
`llama-export-lora` merges the GGUF LoRA into the weights `merge` wrote."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ft import data
from lora_ft.export import gguf_export, merge

from .conftest import PAIRS

pytestmark = pytest.mark.slow
PROMPTS = [data.format_prompt(i, x) for i, x, _ in PAIRS]
# Kept between runs (venvs and a llama.cpp build take minutes): not the tests' throwaway lora_ft cache
CACHE = Path(os.environ.get("LORA_FT_INTEROP_CACHE", Path.home() / ".cache" / "lora_ft" / "interop"))

OLD_READER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
export, adapter, base, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(export)
batch = tokenizer(prompts, padding=True, return_tensors="pt")
with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(export)(**batch).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(**batch).logits
print(json.dumps({"merged": merged.tolist(), "peft": peft.tolist(), "ids": batch["input_ids"].tolist(),
                  "tokenizer": type(AutoTokenizer.from_pretrained(adapter)).__name__}))
"""


def _venv(name: str, *packages: str) -> Path:
    python = CACHE / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CACHE / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=1200)
    return python


@pytest.fixture(scope="module")
def export(instruct_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter merged (gpt2.gguf, f32) and alone as a GGUF LoRA (gpt2.lora.gguf)."""
    folder = tmp_path_factory.mktemp("interop") / "gpt2"
    merge.merge(instruct_run[0].adapter_dir, folder, gguf="f32", gguf_adapter=True)
    return folder


def test_transformers_4_loads_the_export_and_the_adapter(export: Path, instruct_run):
    python = _venv("tf4", "torch==2.13.0", "transformers==4.57.*", "peft==0.17.*")
    adapter = instruct_run[0].adapter_dir
    base = json.loads((adapter / "lora_ft.json").read_text())["base"]["location"]
    done = subprocess.run(
        [str(python), "-c", OLD_READER, str(export), str(adapter), base, json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(export)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert old["ids"] == batch["input_ids"].tolist()
    with torch.no_grad():
        new = AutoModelForCausalLM.from_pretrained(export)(**batch).logits
    assert torch.allclose(torch.tensor(old["merged"]), new, atol=1e-4)
    assert torch.allclose(torch.tensor(old["peft"]), new, atol=1e-4)


def _llama_cpp() -> Path:
    """llama.cpp's sources as llama-cpp-python's source distribution vendors them, unpacked once into the cache."""
    source = CACHE / "llama-cpp-python"
    if not source.exists():
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*download, "-d", str(source), "llama-cpp-python"], check=True, timeout=1200)
    unpacked = CACHE / "src"
    if not unpacked.exists():
        with tarfile.open(next(source.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(unpacked, filter="data")
    return next(unpacked.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


def _built(target: str) -> Path:
    """llama.cpp's program `target`, built once with cmake (CPU only, no network, no server)."""
    llama_cpp = _llama_cpp()
    program = llama_cpp / "build" / "bin" / target
    if not program.exists():
        configure = ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"]
        subprocess.run([*configure, "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], cwd=llama_cpp, check=True)
        build = ["cmake", "--build", "build", "-j2", "--target", target]
        subprocess.run(build, cwd=llama_cpp, check=True, capture_output=True, timeout=1800)
    return program


def _answer(output: str, prompt: str) -> str:
    return output.split(prompt, 1)[-1].replace("<|endoftext|>", "").replace("[end of text]", "").strip()


def test_llama_cpp_answers_as_generate(export: Path):
    """llama.cpp itself (its `llama-simple`, built here with cmake) answers the four prompts greedily from the f32
    GGUF with the adapter's own answers."""
    simple = _built("llama-simple")
    for (_, _, expected), prompt in zip(PAIRS, PROMPTS, strict=True):
        done = subprocess.run(
            [str(simple), "-m", str(export / "gpt2.gguf"), "-n", "24", prompt],  # the prompt as an argument, exactly
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert _answer(done.stdout, prompt) == expected


@pytest.fixture(scope="module")
def base_gguf(instruct_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter's base alone (the tiny GPT-2 checkpoint), written as GGUF f32 by lora_ft's writer."""
    base = Path(json.loads((instruct_run[0].adapter_dir / "lora_ft.json").read_text())["base"]["location"])
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    tokenizer = AutoTokenizer.from_pretrained(base)
    gguf_export.write(AutoModelForCausalLM.from_pretrained(base), tokenizer, base, path, "f32", "base", None)
    return path


def test_llama_cpp_applies_the_gguf_adapter(export: Path, base_gguf: Path, tmp_path: Path):
    """The adapter as a GGUF LoRA on the base: `llama-completion --lora` answers the four prompts greedily with the
    adapter's answers, and `llama-export-lora` merges it into the weights `merge --gguf` wrote."""
    completion = _built("llama-completion")
    lora = export / "gpt2.lora.gguf"
    for (_, _, expected), prompt in zip(PAIRS, PROMPTS, strict=True):
        command = [str(completion), "-m", str(base_gguf), "--lora", str(lora), "-p", prompt, "-n", "24"]
        command += ["--temp", "0", "-no-cnv", "--no-display-prompt", "--no-warmup"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-2000:]
        assert _answer(done.stdout, prompt) == expected
    merged = tmp_path / "merged.gguf"
    export_lora = _built("llama-export-lora")
    command = [str(export_lora), "-m", str(base_gguf), "--lora", str(lora), "-o", str(merged)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = {t.name: t for t in gguf.GGUFReader(merged).tensors}
    for tensor in gguf.GGUFReader(export / "gpt2.gguf").tensors:
        other = gguf.quants.dequantize(theirs[tensor.name].data, theirs[tensor.name].tensor_type)
        assert np.allclose(other.reshape(tensor.data.shape), tensor.data, atol=1e-5), tensor.name


def test_llama_cpp_converter_converts_the_export_as_merge_does(export: Path, tmp_path: Path):
    llama_cpp = _llama_cpp()
    python = _venv("tf4", "torch==2.13.0", "transformers==4.57.*", "peft==0.17.*")  # llama.cpp requires 4.x
    converted = tmp_path / "converted.gguf"
    done = subprocess.run(
        [str(python), "convert_hf_to_gguf.py", str(export), "--outfile", str(converted), "--outtype", "f32"],
        cwd=llama_cpp,
        env={"PYTHONPATH": str(llama_cpp / "gguf-py"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs, ours = gguf.GGUFReader(converted), gguf.GGUFReader(export / "gpt2.gguf")
    tensors = {t.name: t for t in theirs.tensors}
    assert tensors.keys() == {t.name for t in ours.tensors}
    for tensor in ours.tensors:
        other = tensors[tensor.name]
        assert np.array_equal(gguf.quants.dequantize(other.data, other.tensor_type), tensor.data), tensor.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert theirs.get_field(key).contents() == ours.get_field(key).contents(), key
