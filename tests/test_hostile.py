"""Hostile adapters and requests: chat templates that loop, recurse or build huge strings are rendered in the
sandbox (bounded, one-line errors), in `generate` and in a real `serve` process that keeps answering /health and
other requests and still ends on SIGTERM; a template changed since training is refused; a request that fails inside
a batch fails alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from transformers import GPT2TokenizerFast

from lora_ft.core import sandbox
from lora_ft.core.commands import ServeLimits
from lora_ft.core.errors import UserError
from lora_ft.core.files import MANIFEST_NAME
from lora_ft.data import chat
from lora_ft.engine import generation
from lora_ft.serve import pool
from lora_ft.tasks import instruct

from .conftest import GPT2_TOKENIZER, run_cli
from .test_chat import TWO_TURNS, chat_run  # noqa: F401  (a fixture)
from .test_serve import Server

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
RECURSE = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
HUGE = "{{ 'x' * 6000000000 }}"
LONG = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
REFUSES = "{{ raise_exception('this template takes no system message') }}"


@pytest.fixture
def tokenizer():
    return GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)


@pytest.mark.parametrize(
    ("template", "said"),
    [
        (RECURSE, "recurses too deeply"),
        (HUGE, "more memory than a render may have"),
        (LONG, "renders over 8,000,000 characters"),
        (REFUSES, "the chat template refuses it (this template takes no system message)"),
    ],
)
def test_a_hostile_template_is_one_line_and_the_next_render_works(tokenizer, template: str, said: str):
    tokenizer.chat_template = chat.DEFAULT_TEMPLATE
    chat.render(tokenizer, TWO_TURNS[1:2])  # a renderer started: its start (seconds on a busy machine) is not timed
    tokenizer.chat_template = template
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^messages: ") as caught:
        chat.render(tokenizer, TWO_TURNS[:2], where="messages")
    assert said in str(caught.value) and "\n" not in str(caught.value)
    assert time.monotonic() - started < sandbox.TIMEOUT_S
    tokenizer.chat_template = chat.DEFAULT_TEMPLATE
    assert chat.render(tokenizer, [{"role": "user", "content": "Hi"}]) == "<|user|>\nHi\n"


def test_a_looping_template_is_stopped_at_the_time_bound(tokenizer, monkeypatch):
    monkeypatch.setattr(sandbox, "TIMEOUT_S", 1.0)
    tokenizer.chat_template = LOOP
    started = time.monotonic()
    with pytest.raises(UserError, match=r"took over 1 s to render \(a loop\?\)"):
        chat.render(tokenizer, TWO_TURNS[1:2])
    assert time.monotonic() - started < 5
    tokenizer.chat_template = chat.DEFAULT_TEMPLATE
    assert chat.render(tokenizer, [{"role": "user", "content": "Hi"}]) == "<|user|>\nHi\n"


def test_sandboxed_rendering_equals_transformers(tokenizer):
    """The sandbox renders as `apply_chat_template` does (the same renderer, in another process)."""
    chat.use_template(tokenizer)
    for add in (False, True):
        ours = chat.render(tokenizer, TWO_TURNS[:3], add_generation_prompt=add)
        assert ours == tokenizer.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=add)


def _with_template(source: Path, folder: Path, template: str, record: bool) -> Path:
    """A copy of a chat adapter whose template is `template`; with `record`, its manifest says so too (a hostile
    folder made consistent), else the manifest still records the template it was trained with."""
    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "chat_template" in config:
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if record:
        manifest = json.loads((folder / "lora_ft.json").read_text(encoding="utf-8"))
        sha = hashlib.sha256(template.encode("utf-8")).hexdigest()
        manifest["data"]["chat_template"] |= {"template": template, "sha256": sha}
        (folder / "lora_ft.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_a_template_changed_since_training_is_refused(chat_run, tmp_path: Path):  # noqa: F811
    changed = _with_template(chat_run.adapter_dir, tmp_path / "changed", chat.DEFAULT_TEMPLATE + " ", record=False)
    for command in (
        ["generate", str(changed), "--instruction", "hi"],
        ["merge", str(changed), "--output", str(tmp_path / "merged")],
    ):
        done = run_cli(*command)
        code, err = done.returncode, done.stderr
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "chat_template.jinja: the chat template is not the one it was trained with" in err
    assert not (tmp_path / "merged").exists()


def test_generate_with_a_looping_template_exits_2_in_one_line(chat_run, tmp_path: Path):  # noqa: F811
    looping = _with_template(chat_run.adapter_dir, tmp_path / "looping", LOOP, record=True)
    started = time.monotonic()
    done = run_cli("generate", str(looping), "--instruction", "hi")
    code, err = done.returncode, done.stderr
    assert code == 2 and "took over 10 s to render" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - started < sandbox.TIMEOUT_S + 30


def test_serve_survives_a_looping_template_and_ends_on_sigterm(chat_run, tmp_path: Path):  # noqa: F811
    """One adapter's template loops: its requests get a 400 after the time bound, while /health and the other
    adapter (on the same base) answer at once; SIGTERM during such a render still ends the server."""
    looping = _with_template(chat_run.adapter_dir, tmp_path / "looping", LOOP, record=True)
    good = tmp_path / "good"
    shutil.copytree(chat_run.adapter_dir, good)
    server = Server(str(looping), str(good))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            bad: list[httpx.Response] = []
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            sender = threading.Thread(
                target=lambda: bad.append(client.post("/v1/chat/completions", json={"model": "looping"} | body))
            )
            sender.start()
            time.sleep(1.0)
            for _ in range(3):
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                assert time.monotonic() - started < 1.0
            assert client.post("/v1/chat/completions", json={"model": "good"} | body).status_code == 200
            assert sender.is_alive()  # answered while the looping render still runs
            sender.join(60)
            assert bad[0].status_code == 400 and "took over 10 s to render" in bad[0].json()["error"]["message"]

            pending = httpx.Client(base_url=server.url, timeout=60)  # still waiting when the server is told to stop
            threading.Thread(
                target=lambda: pending.post("/v1/chat/completions", json={"model": "looping"} | body), daemon=True
            ).start()
            time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        server.process.wait(30)
        assert time.monotonic() - started < 20
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert "Traceback" not in server.output, server.output


def test_a_request_that_fails_inside_a_batch_fails_alone(chat_run, monkeypatch):  # noqa: F811
    """Three prompts batched together, one of which makes the forward pass fail: the batch runs again one request at
    a time, so the two good ones get the answers they get alone and only the poisoned one an error."""
    registry = pool.load([str(chat_run.adapter_dir)], ServeLimits(batch_wait_ms=300))
    real = generation.generate_batch

    def failing(model, tokenizer, prompts, *args, **kwargs):
        if any("POISON" in p for p in prompts):
            raise RuntimeError("poisoned row")
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", failing)
    sampling = {"temperature": 0.0, "top_p": 1.0, "seed": None}
    events: dict[str, tuple[str, object]] = {}
    done = threading.Semaphore(0)

    def notify_for(prompt: str):
        def notify(kind: str, value: object) -> None:
            if kind in ("done", "error"):
                events[prompt] = (kind, value)
                done.release()

        return notify

    alone = {}
    for prompt in ("Say hi.", "Say bye."):
        registry.generate("adapter", {"instruction": prompt, "raw": True}, 6, sampling, notify_for(prompt))
        assert done.acquire(timeout=60)
        alone[prompt] = events[prompt][1][0].response
    events.clear()
    for prompt in ("Say hi.", "POISON", "Say bye."):
        registry.generate("adapter", {"instruction": prompt, "raw": True}, 6, sampling, notify_for(prompt))
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert events["POISON"] == ("error", "RuntimeError: poisoned row")
    for prompt in ("Say hi.", "Say bye."):
        kind, (made, _) = events[prompt]
        assert kind == "done" and made.response == alone[prompt]
    assert registry.stats.snapshot()["largest_batch"] == 3


def test_greedy_answers_do_not_depend_on_their_batch_mates(tiny_gpt2: Path):
    """Prompts of very different lengths (a few tokens to most of the tiny model's 256 positions), in float32: each
    answered in one batch equals it answered alone, token for token, and a short one keeps its whole room although
    a long one is beside it (it was cut to what the long one left)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = GPT2TokenizerFast.from_pretrained(tiny_gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32).eval()
    prompts = ["Say hi.", "word " * 230, "Name three colors.", "story " * 120, "Why?"]
    alone = [instruct.generate(model, tokenizer, [prompt], 60)[0] for prompt in prompts]
    together = instruct.generate(model, tokenizer, prompts, 60, batch_size=len(prompts))
    assert together == alone
    assert alone[0].new_tokens == 60 or alone[0].stopped_at_eos
    assert together[1].new_tokens <= 256 - 230


ABSURD = [
    ["spam", "--lr", "inf"],
    ["spam", "--weight-decay", "inf"],
    ["spam", "--epochs", "nan"],
    ["instruct", "--epochs", "inf"],
    ["spam", "--lora-alpha", "100000000000"],
    ["serve", "nowhere", "--port", "70000"],
    ["serve", "nowhere", "--port", "-1"],
    ["serve", "nowhere", "--header-timeout", "0"],
]


def _with_output(args: list[str], tmp_path: Path) -> list[str]:
    """A training command's args with an --output that must not appear (serve writes nothing)."""
    return args if args[0] == "serve" else [*args, "--output", str(tmp_path / "out")]


@pytest.mark.parametrize("args", ABSURD)
def test_non_finite_or_absurd_numbers_stop_before_anything_loads(args: list[str], tmp_path: Path):
    done = run_cli(*_with_output(args, tmp_path))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and args[-2] in done.stderr.replace("'", "--").replace("_", "-")
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_is_told_before_torch_is_imported(tmp_path: Path):
    """A typo costs a second, not the import of torch, transformers and PEFT (7 s at one thread)."""
    script = (
        "import json, sys\nfrom lora_ft.cli import main\n"
        "codes = [main(args) for args in json.loads(sys.argv[1])]\n"
        "print(json.dumps([codes, [m for m in ('torch', 'peft', 'transformers.trainer') if m in sys.modules]]))"
    )
    commands = [_with_output(args, tmp_path) for args in ABSURD]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True)
    assert json.loads(done.stdout) == [[2] * len(ABSURD), []], done.stderr


def test_names_are_escaped_and_long_values_cut_in_one_line(tiny_gpt2: Path, tmp_path: Path):
    # A folder named to forge a row of `adapters` and to colour the terminal, with a manifest that cannot be read.
    forged = tmp_path / "real\nforged-row adapter\x1b[31m"
    forged.mkdir()
    (forged / MANIFEST_NAME).write_text("{not json")
    done = run_cli("adapters", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("path") and lines[2].startswith("unreadable: ")  # header, row, why
    assert "\x1b" not in done.stdout and "real\\nforged-row adapter\\x1b[31m" in lines[1]
    # A value pasted 100 KB long is echoed cut to one line that still says what failed and what to do.
    for args in (["spam", "--lr", "x" * 100_000], ["spam", "--nothing", "y\n" * 50_000]):
        done = run_cli(*args)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and len(done.stderr) < 1100, done.stderr
        assert done.stderr.startswith("error: ") and "characters cut" in done.stderr
        assert done.stderr.rstrip().endswith("--help)")
    data, output = str(tmp_path / ("z" * 100_000)), str(tmp_path / "out")
    done = run_cli("spam", "--model", str(tiny_gpt2), "--data", data, "--output", output)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and len(done.stderr) < 1100, done.stderr
    assert done.stderr.startswith("error: ") and "characters cut" in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # how Python decodes stdin (the C locale's, others')
def test_binary_standard_input_is_refused_in_one_line(chat_run, errors: str):  # noqa: F811
    folder = chat_run.adapter_dir
    env = {**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"}
    for args in (["chat", str(folder)], ["generate", str(folder), "--file", "-"]):
        done = subprocess.run(
            [sys.executable, "-m", "lora_ft", *args], input=b"hello\n\xff\xfe\x00binary\n", capture_output=True, env=env
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.decode().splitlines()[-1].startswith("error: <stdin>")
        assert done.stderr.decode().splitlines()[-1].endswith(": not UTF-8 text (binary input?)")


def test_a_test_example_over_max_length_is_refused_before_training(tiny_gpt2: Path, tmp_path: Path):
    # Every other conversation is 600 words; with seed 2 the test split holds one (train and val just drop theirs).
    turns = [("word " * 600 if i % 2 == 0 else f"question {i}", f"answer {i}") for i in range(40)]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in turns]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    settings = ["--model", str(tiny_gpt2), "--max-length", "256", "--max-steps", "2", "--seed", "2"]
    done = run_cli("instruct", *settings, "--data", str(tmp_path / "chat.json"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(
        r"error: .*chat\.json: item \d+ is in the test split and is \d+ tokens, more than the model's 256 positions: ",
        last,
    )
    assert "training" not in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]
