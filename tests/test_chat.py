"""Chat-format data for `instruct`: OpenAI-style and ShareGPT records read and detected (JSON and JSONL), malformed
ones refused in one line naming the record, the label mask of assistant turns checked token by token, and a tiny
run whose `generate`, `chat` and `serve` put prompts in the chat template it recorded."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2TokenizerFast

from lora_ft import cli, data
from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError
from lora_ft.data import chat
from lora_ft.engine import generation, models
from lora_ft.export import merge
from lora_ft.serve import pool, server
from lora_ft.tasks import instruct

from .conftest import GPT2_TOKENIZER, write_examples

EOS = "<|endoftext|>"
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
TWO_TURNS = [
    {"role": SYSTEM, "content": "Answer briefly."},
    {"role": USER, "content": "Name the capital of France."},
    {"role": ASSISTANT, "content": "Paris."},
    {"role": USER, "content": "And of Italy?"},
    {"role": ASSISTANT, "content": "Rome."},
]
CONVERSATIONS = [
    TWO_TURNS,
    [{"role": USER, "content": "Add 2 and 3."}, {"role": ASSISTANT, "content": "5."}],
    [
        {"role": USER, "content": "Give a synonym for happy."},
        {"role": ASSISTANT, "content": "Joyful."},
        {"role": USER, "content": "Another one?"},
        {"role": ASSISTANT, "content": "Glad."},
    ],
    [
        {"role": SYSTEM, "content": "You reverse words."},
        {"role": USER, "content": "stop"},
        {"role": ASSISTANT, "content": "pots"},
    ],
]
SHAREGPT_ROLES = {SYSTEM: "system", USER: "human", ASSISTANT: "gpt"}


def sharegpt(messages: list[dict[str, str]]) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]}


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer() -> GPT2TokenizerFast:
    tokenizer = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)
    chat.use_template(tokenizer)
    return tokenizer


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("style", ["messages", "sharegpt"])
def test_each_format_is_detected_and_read(tmp_path: Path, style: str, suffix: str):
    records = [{"messages": c} if style == "messages" else sharegpt(c) for c in CONVERSATIONS]
    path = write(tmp_path / f"data{suffix}", records)
    rows = chat.read_examples(path)
    assert [row["messages"] for row in rows] == CONVERSATIONS
    assert rows[3]["record"] == f"{path}: {'item' if suffix == '.json' else 'line'} 4"


def test_instruction_records_are_read_as_before(tmp_path: Path):
    path = write_examples(tmp_path / "four.json")
    assert chat.read_examples(path) == data.read_instructions(path)


GOOD = {"messages": CONVERSATIONS[1]}
U, A = {"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello"}
MALFORMED = [  # (record 2, what the error says after "FILE: item 2")
    ({"messages": {"role": USER}}, ": 'messages' must be a list of messages, got dict"),
    ({"messages": []}, ": 'messages' is empty"),
    ({"messages": ["Hi", A]}, ", message 1 is not a JSON object"),
    ({"messages": [{"content": "Hi"}, A]}, ", message 1 has no 'role'"),
    (
        {"messages": [{"role": "bot", "content": "Hi"}, A]},
        ", message 1: unknown 'role' 'bot' (known: system, user, assistant)",
    ),
    ({"messages": [{"role": 1, "content": "Hi"}, A]}, ", message 1: unknown 'role' 1 (known: system, user, assistant)"),
    ({"messages": [{"role": USER}, A]}, ", message 1 has no 'content'"),
    ({"messages": [U, {"role": ASSISTANT, "content": ["Hello"]}]}, ", message 2: 'content' must be a string, got list"),
    ({"messages": [U, {"role": ASSISTANT, "content": " \n"}]}, ", message 2: 'content' is empty"),
    ({"messages": [{"role": SYSTEM, "content": "Be brief."}, U]}, ": has no assistant message (nothing to learn)"),
    ({"messages": [U, A, U]}, ": ends with a user message; a conversation ends with the assistant's answer"),
    (
        {"messages": [U, {"role": SYSTEM, "content": "Be brief."}, A]},
        ", message 2: a system message can only come first",
    ),
    ({"messages": [A, U, A]}, ": the conversation must start with a user message (after an optional system one)"),
    (
        sharegpt(CONVERSATIONS[1]),
        " is a ShareGPT record ('conversations'), but item 1 is an OpenAI-style record ('messages'): "
        "one format per file",
    ),
    (
        {"instruction": "Add 2 and 3.", "output": "5."},
        " is an instruction record (no 'messages' or 'conversations'), but item 1 is an OpenAI-style record "
        "('messages'): one format per file",
    ),
]


@pytest.mark.parametrize(("bad", "said"), MALFORMED)
def test_malformed_conversations_get_one_line_naming_the_record(tmp_path: Path, bad: dict, said: str):
    path = write(tmp_path / "data.json", [GOOD, bad])
    with pytest.raises(UserError) as caught:
        chat.read_examples(path)
    assert str(caught.value) == f"{path}: item 2{said}"


@pytest.mark.parametrize(
    ("records", "said"),
    [
        ([sharegpt(CONVERSATIONS[1]), {"conversations": [{"from": "user", "value": "Hi"}]}],
         "line 2, message 1: unknown 'from' 'user' (known: system, human, gpt)"),
        ([sharegpt(CONVERSATIONS[1]), sharegpt([{"role": USER, "content": ""}, A])],
         "line 2, message 1: 'value' is empty"),
    ],
)  # fmt: skip
def test_sharegpt_errors_name_its_keys_and_the_line(tmp_path: Path, records: list[dict], said: str):
    path = write(tmp_path / "data.jsonl", records)
    with pytest.raises(UserError, match="^" + re.escape(f"{path}: {said}") + "$"):
        chat.read_examples(path)


def test_a_malformed_file_exits_2_with_one_line(tiny_gpt2: Path, tmp_path: Path, capsys):
    path = write(tmp_path / "data.json", [GOOD, MALFORMED[8][0]])
    args = ["instruct", "--model", str(tiny_gpt2), "--data", str(path), "--output", str(tmp_path / "out")]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"error: {path}: item 2{MALFORMED[8][1]}\n"


def test_label_mask_is_the_assistant_turns_token_by_token(tokenizer: GPT2TokenizerFast):
    """System, user and template tokens are -100; every token of both answers, and the EOS that ends each, is a
    target. The same mask as transformers' own (`{% generation %}` markers) on the template marked so."""
    ids, labels = chat.encode(tokenizer, TWO_TURNS)
    pieces = [
        ("<|system|>\nAnswer briefly.\n<|user|>\nName the capital of France.\n<|assistant|>\n", False),
        ("Paris." + EOS, True),
        ("<|user|>\nAnd of Italy?\n<|assistant|>\n", False),
        ("Rome." + EOS, True),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text)["input_ids"]
        expected_ids += piece
        expected_labels += piece if trained else [-100] * len(piece)
    assert ids == expected_ids
    assert labels == expected_labels
    assert tokenizer.decode([t for t in labels if t != -100]) == f"Paris.{EOS}Rome.{EOS}"

    answer = "{{- message['content'] + eos_token }}"
    marked = chat.DEFAULT_TEMPLATE.replace(answer, "{% generation %}" + answer + "{% endgeneration %}")
    assert marked != chat.DEFAULT_TEMPLATE
    theirs = tokenizer.apply_chat_template(TWO_TURNS, chat_template=marked, return_assistant_tokens_mask=True)
    assert theirs["input_ids"] == ids
    assert theirs["assistant_masks"] == [int(label != -100) for label in labels]


def test_a_long_conversation_is_masked_as_transformers_masks_it(tokenizer: GPT2TokenizerFast, monkeypatch):
    """1,000 turns: their 1,000 prefixes render in groups under the sandbox's bound (in one call they went over it and
    the conversation was refused), and the mask is still transformers' own. Over `max_length`, a conversation is
    rendered once and gets no targets (it is left out or refused by its length): its prefixes are never rendered."""
    turns = [(f"question {i} about things", f"answer {i}, said plainly") for i in range(500)]
    messages = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), (ASSISTANT, a))]
    calls = []
    real = chat.sandbox.render
    monkeypatch.setattr(chat.sandbox, "render", lambda t, asked, k: calls.append(len(asked)) or real(t, asked, k))
    ids, labels = chat.encode(tokenizer, messages)
    assert len(calls) > 2 and sum(calls) == 1 + 2 * 500  # the whole, then each answer's two prefixes, in groups
    answer = "{{- message['content'] + eos_token }}"
    marked = chat.DEFAULT_TEMPLATE.replace(answer, "{% generation %}" + answer + "{% endgeneration %}")
    theirs = tokenizer.apply_chat_template(messages, chat_template=marked, return_assistant_tokens_mask=True)
    assert theirs["input_ids"] == ids and theirs["assistant_masks"] == [int(label != -100) for label in labels]
    calls.clear()
    assert chat.encode(tokenizer, messages, max_length=len(ids) - 1) == (ids, [-100] * len(ids)) and calls == [1]


def test_a_template_whose_answers_do_not_end_at_eos_is_refused(tokenizer: GPT2TokenizerFast):
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="tokenizer chat template does not end an assistant turn with the EOS token"):
        chat.use_template(chatml)


def test_sft_trainer_trains_on_these_labels_as_they_are(tiny_gpt2: Path, tokenizer, tmp_path: Path):
    rows = [{"messages": c, "record": f"item {i}"} for i, c in enumerate(CONVERSATIONS, 1)]
    encoded = chat.encoded(data.instruction_splits(rows * 5, seed=1)["train"].select(range(4)), tokenizer)
    config = load_config("instruct", overrides={"model": str(tiny_gpt2), "batch_size": 4, "max_length": 256})
    base = models.load_causal_base(models.resolve_model(str(tiny_gpt2)), tokenizer)
    trainer = instruct.build_trainer(config, base, tokenizer, encoded, encoded, tmp_path, "fp32")
    assert trainer.train_dataset["input_ids"] == encoded["input_ids"]
    assert trainer.train_dataset["labels"] == encoded["labels"]


@pytest.fixture(scope="module")
def chat_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two steps on 20 conversations (17/1/2), written as OpenAI-style JSONL."""
    folder = tmp_path_factory.mktemp("chat")
    path = write(folder / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS * 5])
    overrides = {
        "model": str(tiny_gpt2),
        "data": str(path),
        "output": str(folder / "adapter"),
        "max_steps": 2,
        "batch_size": 4,
        "test_limit": 2,
        "max_new_tokens": 6,
        "max_length": 128,
    }
    return instruct.train(load_config("instruct", overrides=overrides))


def expected_prompt(messages: list[dict[str, str]]) -> str:
    """The default template, written out: what a chat-trained GPT-2 adapter must be prompted with."""
    turns = "".join(f"<|{m['role']}|>\n{m['content']}" + (EOS if m["role"] == ASSISTANT else "\n") for m in messages)
    return turns + "<|assistant|>\n"


def test_a_chat_run_records_its_template_and_answers_in_it(chat_run, capsys, monkeypatch):
    folder, manifest = chat_run.adapter_dir, chat_run.manifest
    recorded = manifest["data"]["chat_template"]
    assert manifest["data"]["prompt_template"] == "chat"
    assert recorded == {
        "source": "lora_ft default",
        "sha256": hashlib.sha256(chat.DEFAULT_TEMPLATE.encode()).hexdigest(),
        "template": chat.DEFAULT_TEMPLATE,
    }
    assert AutoTokenizer.from_pretrained(folder).chat_template == chat.DEFAULT_TEMPLATE
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == chat.DEFAULT_TEMPLATE
    assert manifest["data"]["split_sizes"] == {"train": 17, "val": 1, "test": 2}
    assert manifest["metrics"]["val"]["tokens"] > 0 and manifest["metrics"]["test"]["examples"] == 2

    # The test answered the last assistant turn given the conversation before it; `generate` prompts the same way.
    records = json.loads((folder / instruct.RESPONSES).read_text())
    for record in records:
        assert set(record) == {"messages", "output", "model_response"}
        assert record["messages"] + [{"role": ASSISTANT, "content": record["output"]}] in CONVERSATIONS
    answers = instruct.respond(folder, [{"messages": r["messages"]} for r in records])
    assert [a.prompt for a in answers] == [expected_prompt(r["messages"]) for r in records]
    assert [a.response for a in answers] == [r["model_response"] for r in records]
    assert cli.main(["generate", str(folder), "--file", str(folder / instruct.RESPONSES), "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["response"] for p in printed] == [r["model_response"] for r in records]

    # `chat` keeps the conversation: its second prompt holds the first exchange.
    seen: list[str] = []
    real = generation.generate
    monkeypatch.setattr(
        generation, "generate", lambda m, t, prompts, *a, **k: seen.extend(prompts) or real(m, t, prompts, *a, **k)
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("Name the capital of France.\nAnd of Italy?\n"))
    assert cli.main(["chat", str(folder)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    history = [TWO_TURNS[1], {"role": ASSISTANT, "content": first}, TWO_TURNS[3]]
    assert seen == [expected_prompt(history[:1]), expected_prompt(history)]


def test_serve_renders_the_whole_conversation_for_a_chat_adapter(chat_run):
    body = server.ChatRequest(
        model="adapter", messages=[{"role": "developer", "content": "Answer briefly."}, *TWO_TURNS[1:4]]
    )
    registry = pool.load([str(chat_run.adapter_dir)])
    done = threading.Event()
    request = {"instruction": body.instruction(), "messages": body.conversation()}
    sampling = {"temperature": 0.0, "top_p": 1.0, "seed": None}
    job = registry.generate("adapter", request, 4, sampling, lambda kind, value: kind == "done" and done.set())
    assert job.inputs == [expected_prompt(TWO_TURNS[:4])]
    assert done.wait(60)
    with pytest.raises(UserError, match="a request ends with the user's turn"):
        registry.generate("adapter", {"instruction": "x", "messages": TWO_TURNS}, 4, sampling, lambda *_: None)


def test_gguf_export_of_a_chat_adapter_carries_its_template(chat_run, tmp_path: Path):
    """`merge --gguf`: the GGUF holds the chat template (llama.cpp applies it), the Modelfile the same turns in
    Ollama's template language, rendered here by hand for one conversation."""
    import gguf

    result = merge.merge(chat_run.adapter_dir, tmp_path / "export", gguf="f32")
    reader = gguf.GGUFReader(result.output / "export.gguf")
    assert reader.get_field("tokenizer.chat_template").contents() == chat.DEFAULT_TEMPLATE
    text = (result.output / "Modelfile").read_text()
    assert "{{- range .Messages }}<|{{ .Role }}|>" in text and f'{{{{ if eq .Role "assistant" }}}}{EOS}' in text
    assert result.manifest.merge["gguf"]["prompt_template"] == "chat"
