"""Shared fixtures: the real data and tokenizer from ../shared, a small random-weight GPT-2, a trained adapter."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LORA_FT_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"

# Four short examples, five copies each: 20 rows make a 17/1/2 split, and every test answer was seen in training.
PAIRS = [
    ("Name the capital of France.", "", "Paris."),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Give a synonym for happy.", "", "Joyful."),
    ("Reverse the word.", "stop", "pots"),
]

# Every test (and every CLI subprocess they start) reads data from ../shared and never reaches a network.
os.environ["LORA_FT_DATA_DIR"] = str(DATA_DIR)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LORA_FT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_ft-test-cache-")  # not the user's cache
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs the suite in one worker process per core (pyproject's addopts): each computes on one thread, as
# do the CLI processes it starts, so that workers do not fight over the cores (the tiny models gain nothing from a
# second thread anyway). Set before torch is imported: test modules import it after this file.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# Runs whose exact results tests check compute in float32 on every machine: `precision` auto means bf16 where the
# CPU runs it natively, and the overfit answers and fp32 tolerances below do not hold there. The bf16 path has
# tests of its own (test_bf16.py); `LORA_FT_NATIVE_BF16=1 pytest` (or 0) runs the whole suite as on either CPU.
EXACT = {"precision": "fp32"}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many workers `-n auto` (pyproject's addopts) starts: one per core this process may run on, and one more,
    as part of the suite waits (on servers, sockets and the CLI processes tests start) rather than computes; at
    most 5, as each worker builds the session fixtures again."""
    return min(len(os.sched_getaffinity(0)) + 1, 5)


def pytest_configure(config: pytest.Config) -> None:
    if not (DATA_DIR / "sms_spam_collection" / "SMSSpamCollection").is_file() or not GPT2_TOKENIZER.is_dir():
        pytest.exit(f"tests need the shared data and tokenizer at {SHARED} (set LORA_FT_SHARED)", returncode=4)


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide GPT-2 with random weights and the real GPT-2 tokenizer, saved as a checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256)).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)
    return folder


def tree_sha256(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def run_cli(
    *args: str, stdin: str | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m lora_ft ARGS` in a fresh process (`env` replaces the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "lora_ft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2")


@pytest.fixture(scope="session")
def spam_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA classifier trained on the real SMS split for a few dozen steps; the base hashed before and after."""
    from lora_ft.core.config import load_config
    from lora_ft.tasks import classify

    before = tree_sha256(tiny_gpt2)
    output = tmp_path_factory.mktemp("adapters") / "spam-tiny"
    overrides = {"model": str(tiny_gpt2), "output": str(output), "max_steps": 60, **EXACT}
    config = load_config("spam", overrides=overrides)
    result = classify.train(config)
    return result, before


def write_examples(path: Path) -> Path:
    rows = [{"instruction": i, "input": x, "output": o} for _ in range(5) for i, x, o in PAIRS]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="session")
def instruct_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """LoRA trained until greedy decoding gives the four answers (under a minute on 2 cores). The random base's
    logits are small (frozen final layer norm and tied embeddings), so the loss stays high while the argmax is right."""
    from lora_ft.core.config import load_config
    from lora_ft.tasks import instruct

    folder = tmp_path_factory.mktemp("instruct")
    before = tree_sha256(tiny_gpt2)
    overrides = {
        "model": str(tiny_gpt2),
        "data": str(write_examples(folder / "four.json")),
        "output": str(folder / "adapter"),
        "max_steps": 200,
        "batch_size": 4,
        "lr": 1e-2,
        "max_new_tokens": 24,
        "max_length": 256,  # the tiny model's positions (instruct's default, 512, is refused on it)
        # GPT-2's own dropout, as this fixture was tuned with: without it the loss ends lower, but one of the four
        # greedy answers is still wrong at step 200 (the random base's logits are small; see above)
        "model_dropout": 0.1,
        **EXACT,
    }
    return instruct.train(load_config("instruct", overrides=overrides)), before
