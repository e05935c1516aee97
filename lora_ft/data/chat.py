"""Chat-format data for `instruct`: OpenAI-style `messages` and ShareGPT `conversations` records read and checked (the
format detected from the records, one per file), the chat template a run trains with (the tokenizer's own, or
`DEFAULT_TEMPLATE` for a tokenizer without one, such as GPT-2's), conversations tokenized with labels on their
assistant turns only, and `render_prompt`: the prompt an adapter answers a request with, in the template it was
trained with (chat, or Alpaca), for `generate`, `chat` and `serve` alike."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from .. import data
from ..core import sandbox
from ..core.errors import UserError
from ..core.manifest import Manifest

ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
CHAT = "chat"  # the manifest's `data.prompt_template` of an adapter trained on conversations

# For a tokenizer without a chat template (GPT-2): plain-text role markers that GPT-2's BPE encodes without new
# tokens, each assistant turn ended by the EOS token, so that the model learns to stop where `generate` stops. Nothing
# follows the EOS within the turn: the label mask of a turn then ends at the EOS (see `_assistant_spans`).
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Format:
    """A chat format: the record's key, a message's role and content keys, and its role names (-> ROLES)."""

    name: str
    key: str
    role: str
    content: str
    roles: dict[str, str]


FORMATS = (
    Format("an OpenAI-style record ('messages')", "messages", "role", "content", {r: r for r in ROLES}),
    Format(
        "a ShareGPT record ('conversations')",
        "conversations",
        "from",
        "value",
        {"system": "system", "human": "user", "gpt": "assistant"},
    ),
)
INSTRUCTIONS = "an instruction record (no 'messages' or 'conversations')"


def _format_of(record: dict) -> Format | None:
    return next((f for f in FORMATS if f.key in record), None)


def _one_format(path: Path, records: list[tuple[int, dict]]) -> Format | None:
    """The chat format of every record (None: instruction records). A file of mixed formats is refused at its first
    record unlike the first: its author meant one format, and a silent mix would train on half of it."""
    first = _format_of(records[0][1])
    word = data.record_word(path)
    for number, record in records:
        found = _format_of(record)
        if found is not first:
            name, first_name = (f.name if f else INSTRUCTIONS for f in (found, first))
            raise UserError(
                f"{path}: {word} {number} is {name}, but {word} {records[0][0]} is {first_name}: one format per file"
            )
    return first


def _message(where: str, turn: Any, fmt: Format) -> dict[str, str]:
    """One message as {role, content}, checked: a known role, a non-empty string content."""
    if not isinstance(turn, dict):
        raise UserError(f"{where} is not a JSON object")
    missing = [key for key in (fmt.role, fmt.content) if turn.get(key) is None]
    if missing:
        raise UserError(f"{where} has no '{missing[0]}'")
    role, content = turn[fmt.role], turn[fmt.content]
    if not isinstance(role, str) or role not in fmt.roles:
        raise UserError(f"{where}: unknown '{fmt.role}' {role!r} (known: {', '.join(fmt.roles)})")
    if not isinstance(content, str):
        raise UserError(f"{where}: '{fmt.content}' must be a string, got {type(content).__name__}")
    if not content.strip():
        raise UserError(f"{where}: '{fmt.content}' is empty")
    return {"role": fmt.roles[role], "content": content}


def _check_order(where: str, messages: list[dict[str, str]], request: bool) -> None:
    """A system message first if any, then the user's turn; a training conversation ends with the assistant's answer
    (the last turn is what the test answers), a request with the user's turn (it asks for that answer)."""
    roles = [m["role"] for m in messages]
    for number, role in enumerate(roles[1:], start=2):
        if role == "system":
            raise UserError(f"{where}, message {number}: a system message can only come first")
    if roles[roles[0] == "system" :][:1] != ["user"]:
        raise UserError(f"{where}: the conversation must start with a user message (after an optional system one)")
    if not request and ASSISTANT not in roles:
        raise UserError(f"{where}: has no assistant message (nothing to learn)")
    if request and roles[-1] != "user":
        raise UserError(f"{where}: ends with a {roles[-1]} message; a request ends with the user's turn to answer")
    if not request and roles[-1] != "assistant":
        raise UserError(f"{where}: ends with a {roles[-1]} message; a conversation ends with the assistant's answer")


def conversation(where: str, record: dict, fmt: Format, request: bool = False) -> list[dict[str, str]]:
    """A record's messages as {role, content} (ShareGPT's from/value renamed), checked; `where` names the record."""
    turns = record[fmt.key]
    if not isinstance(turns, list):
        raise UserError(f"{where}: '{fmt.key}' must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise UserError(f"{where}: '{fmt.key}' is empty")
    messages = [_message(f"{where}, message {n}", turn, fmt) for n, turn in enumerate(turns, start=1)]
    _check_order(where, messages, request)
    return messages


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The examples of an `instruct` data file: instruction records as `data.read_instructions` reads them, or
    conversations (OpenAI-style or ShareGPT) as rows of {messages, record}, `record` naming it for later errors."""
    records = data.json_records(path, data.read_text(path))
    fmt = _one_format(path, records) if records else None
    if fmt is None:
        return data.instruction_rows(path, records, with_output=True)
    word = data.record_word(path)
    return [
        {"messages": conversation(f"{path}: {word} {n}", record, fmt), "record": f"{path}: {word} {n}"}
        for n, record in records
    ]


def read_requests(path: Path, text: str) -> list[dict[str, Any]]:
    """What `generate --file` answers: instruction records as `data.read_requests` reads them, or conversations that
    end with the user's turn, as {messages} (a chat run's test_responses.json reads back so)."""
    records = data.json_records(path, text)
    fmt = _one_format(path, records) if records else None
    if fmt is None:
        return data.read_requests(path, text)
    word = data.record_word(path)
    return [{"messages": conversation(f"{path}: {word} {n}", r, fmt, request=True)} for n, r in records]


def is_chat(split: Dataset) -> bool:
    return "messages" in split.column_names


# --- the template, and conversations rendered with it ---------------------------------------------------------


def use_template(tokenizer: Any) -> dict[str, str]:
    """Give `tokenizer` the chat template the run trains with, and return what the manifest records of it (saved with
    the adapter, the tokenizer carries it to `generate`, `chat` and `serve`). Its own template if it has one (SmolLM2),
    else DEFAULT_TEMPLATE. A template whose assistant turn does not contain the EOS token is refused: generation stops
    at EOS, which the model would never learn to produce."""
    own = tokenizer.chat_template
    own = own.get("default") if isinstance(own, dict) else own  # a template shipped as named variants
    template, source = (own, "tokenizer") if own else (DEFAULT_TEMPLATE, "lora_ft default")
    tokenizer.chat_template = template
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = render(tokenizer, probe, where="the chat template")
    ((start, end),) = _assistant_spans(tokenizer, probe, text, "the chat template")
    if tokenizer.eos_token not in text[start:end]:
        raise UserError(
            f"the {source} chat template does not end an assistant turn with the EOS token {tokenizer.eos_token!r}: "
            "the model would not learn to stop"
        )
    return {"source": source, "sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(), "template": template}


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False, where: str = "") -> str:
    """`messages` as text in the tokenizer's chat template, rendered as transformers renders it but in lora_ft's
    sandbox (bounded in time, memory and size: core/sandbox.py); a template that refuses them (some insist that roles
    alternate) or runs over a bound is a UserError naming `where`."""
    return render_all(tokenizer, [(messages, add_generation_prompt)], where)[0]


def render_all(tokenizer: Any, conversations: list[tuple[list[dict[str, str]], bool]], where: str = "") -> list[str]:
    """Several (messages, add_generation_prompt) rendered in one call to the sandbox."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise UserError(f"{where or 'the conversation'}: the tokenizer has no chat template")
    try:
        return sandbox.render(template, conversations, tokenizer.special_tokens_map)
    except sandbox.TemplateRefused as e:
        raise UserError(f"{where or 'the conversation'}: the chat template refuses it ({e})") from None
    except UserError as e:
        raise UserError(f"{where or 'the conversation'}: {e}") from None


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str, where: str) -> list[tuple[int, int]]:
    """Each assistant turn's characters in `text` (the conversation rendered): from the end of the turns before it
    rendered with the generation prompt to the end of the turns up to it, so a turn's end-of-turn/EOS token is in its
    span. That asks of a template only that earlier turns render the same once later ones follow, which is checked.
    The prefixes go to the sandbox in groups that each render at most about half its bound (a long conversation's
    prefixes add up to far more than the conversation: n turns, n prefixes)."""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    asked = [c for i in turns for c in ((messages[:i], True), (messages[: i + 1], False))]
    group = max(2, 2 * (sandbox.MAX_CHARS // 2 // max(1, 2 * len(text))))  # whole (before, through) pairs
    prefixes = [
        p for start in range(0, len(asked), group) for p in render_all(tokenizer, asked[start : start + group], where)
    ]
    spans = []
    for before, through in zip(prefixes[::2], prefixes[1::2], strict=True):
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError(f"{where}: the chat template renders earlier turns differently once later ones follow")
        spans.append((len(before), len(through)))
    return spans


def encode(
    tokenizer: Any, messages: list[dict[str, str]], where: str = "", max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: a token overlapping an assistant turn is a target (the rule of
    transformers' `return_assistant_tokens_mask`), every other token -100. Not TRL's `assistant_only_loss`: it needs
    `{% generation %}` markers in the template, which SmolLM2's (and most models') lacks and TRL 1.16 adds only to
    templates it knows (it refuses SmolLM2's); and the val and test losses must use the very mask training used.
    Tokenized as `generate` tokenizes a prompt, so that the prompt's tokens at training and at serving are the same.
    A conversation over `max_length` tokens gets no targets: it is left out of training and refused as a test example
    by its length alone, and finding its turns would cost a render per turn for nothing."""
    text = render(tokenizer, messages, where=where)
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if max_length is not None and len(ids) > max_length:
        return ids, [-100] * len(ids)
    return ids, _targets(ids, encoding["offset_mapping"], _assistant_spans(tokenizer, messages, text, where))


def _targets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token that overlaps a span (spans in order, apart), else -100: one sweep over tokens and spans together."""
    labels, span = [], 0
    for token, (start, end) in zip(ids, offsets, strict=True):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        inside = span < len(spans) and spans[span][0] < end
        labels.append(token if inside else -100)
    return labels


def encoded(split: Dataset, tokenizer: Any, max_length: int | None = None) -> Dataset:
    """Conversations as SFTTrainer takes them already tokenized: input_ids, and labels on assistant turns only
    (TRL uses both as they are); those over `max_length` tokens without labels (see `encode`)."""
    pairs = zip(split["messages"], split["record"], strict=True)
    rows = [encode(tokenizer, messages, where, max_length) for messages, where in pairs]
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]})


def prepare(splits: DatasetDict, tokenizer: Any) -> tuple[DatasetDict, dict[str, str] | None]:
    """Chat splits ready for a run: the tokenizer given its template (`use_template`, whose record is returned), and
    each conversation's `prompt` (the turns before its last, rendered with the generation prompt) and `output` (that
    last assistant turn), which the test answers and is scored against. Instruction splits pass as they are (None)."""
    if not is_chat(splits["train"]):
        return splits, None
    template = use_template(tokenizer)

    def with_prompts(split: Dataset) -> Dataset:
        pairs = zip(split["messages"], split["record"], strict=True)
        prompts = [render(tokenizer, m[:-1], add_generation_prompt=True, where=where) for m, where in pairs]
        return split.add_column("prompt", prompts).add_column("output", [m[-1]["content"] for m in split["messages"]])

    return DatasetDict({name: with_prompts(split) for name, split in splits.items()}), template


def described(train: Dataset, template: dict[str, str] | None) -> dict[str, Any]:
    """The manifest's record of the prompt format (its `data` section): "chat" with the template itself (its text,
    sha256 and source), or for instruction data "alpaca" / "prompt as given" as before."""
    if template is not None:
        return {"prompt_template": CHAT, "chat_template": template}
    return {"prompt_template": "alpaca" if any(train["instruction"]) else "prompt as given"}


def as_given(row: dict[str, Any]) -> dict[str, Any]:
    """A test example as test_responses.json records it: the conversation before the answer, or as `data.as_given`."""
    return {"messages": row["messages"][:-1]} if "messages" in row else data.as_given(row)


# --- prompts at answering time ----------------------------------------------------------------------------------


def recorded_template(manifest: Manifest) -> str:
    """The chat template a manifest records, checked against the sha256 it records beside it (a hand-edited
    lora_ft.json would otherwise build merge's check prompts in a template the adapter never saw)."""
    recorded = manifest.data.get("chat_template")
    template = recorded.get("template") if isinstance(recorded, dict) else None
    if not isinstance(template, str) or hashlib.sha256(template.encode("utf-8")).hexdigest() != recorded.get("sha256"):
        raise UserError("lora_ft.json: data.chat_template.template is missing or does not match its sha256")
    return template


def trained_on_chat(manifest: Manifest) -> bool:
    return (manifest.data or {}).get("prompt_template") == CHAT


def render_prompt(manifest: Manifest, tokenizer: Any, request: dict[str, Any]) -> str:
    """The prompt an adapter answers `request` with, in the template it was trained with, so that it sees at serving
    the prompt it learned on. A ready `prompt` is used as it is. An adapter trained on conversations gets `messages`
    (or `instruction` and `input` as one user message) in its tokenizer's chat template with the generation prompt;
    one trained on instructions gets the Alpaca prompt of `instruction` and `input` (or of the last user message)."""
    if "prompt" in request:
        return request["prompt"]
    if trained_on_chat(manifest):
        return render(tokenizer, _request_messages(request), add_generation_prompt=True, where="messages")
    instruction = request.get("instruction") or _last_user(request["messages"])
    return data.format_prompt(instruction, request.get("input") or "")


def _request_messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """A request's conversation: its roles those a chat adapter was trained on, the user's turn last."""
    if not request.get("messages"):
        given = request.get("input") or ""
        return [{"role": "user", "content": request["instruction"] + (f"\n\n{given}" if given.strip() else "")}]
    messages = [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
    for number, message in enumerate(messages, start=1):
        if message["role"] not in ROLES:
            raise UserError(f"messages: message {number}: role {message['role']!r} is not one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "user":
        raise UserError(f"messages: ends with a {messages[-1]['role']} message; a request ends with the user's turn")
    return messages


def _last_user(messages: list[dict[str, str]]) -> str:
    """An instruction adapter answers single instructions: the last user message is the one."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise UserError("messages: no user message to answer")
    return users[-1]
