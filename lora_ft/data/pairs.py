"""Preference data for `prefer`: pairs of a chosen and a rejected answer to one prompt, read and checked from the
course's Alpaca-style records (`instruction`, `input`, `chosen`, `rejected`) or TRL's standard preference formats
(`prompt`/`chosen`/`rejected` as strings, or as conversations: OpenAI-style messages, the prompt explicit or shared by
both conversations), in a .json list or a .jsonl file; and which pairs are degenerate (the two answers identical, or
one empty), which teach nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset

from .. import data
from ..core.errors import UserError
from . import chat

ANSWERS = ("chosen", "rejected")
MESSAGES = chat.FORMATS[0]  # TRL's conversational format is OpenAI-style: role/content


def read_pairs(path: Path) -> list[dict[str, str]]:
    """Rows of {instruction, input, prompt, messages, chosen, rejected, record}: `instruction` and `input` of an
    Alpaca-style record, or a raw `prompt` string, or `messages` (JSON text of the conversation before the answer);
    the others empty. One format per file, as `instruct`'s readers ask."""
    records = data.json_records(path, data.read_text(path))
    if not records:
        raise UserError(f"{path}: holds no preference pairs")
    word = data.record_word(path)
    rows = [_pair(f"{path}: {word} {number}", record) for number, record in records]
    kinds = [_kind(row) for row in rows]
    for (number, _), kind in zip(records, kinds, strict=True):
        if kind != kinds[0]:
            raise UserError(
                f"{path}: {word} {number} is {kind}, but {word} {records[0][0]} is {kinds[0]}: one format per file"
            )
    return rows


def _kind(row: dict[str, str]) -> str:
    if row["messages"]:
        return "a conversation"
    return "an instruction record" if row["instruction"] else "a prompt string"


def _pair(where: str, record: dict) -> dict[str, str]:
    missing = [key for key in ANSWERS if key not in record]
    if missing:
        raise UserError(f"{where} has no '{missing[0]}'")
    row = {"instruction": "", "input": "", "prompt": "", "messages": "", "record": where}
    if isinstance(record["chosen"], list) or isinstance(record.get("prompt"), list):
        prompt, answers = _conversation(where, record)
        return row | {"messages": json.dumps(prompt, ensure_ascii=False)} | answers
    answers = {key: _text(where, record, key) for key in ANSWERS}
    if "instruction" in record:
        instruction = _text(where, record, "instruction")
        if not instruction.strip():
            raise UserError(f"{where} has an empty 'instruction'")
        given = _text(where, record, "input") if record.get("input") is not None else ""
        return row | {"instruction": instruction, "input": given} | answers
    if "prompt" not in record:
        raise UserError(f"{where} has no 'prompt' or 'instruction'")
    prompt = _text(where, record, "prompt")
    if not prompt.strip():
        raise UserError(f"{where} has an empty 'prompt'")
    return row | {"prompt": prompt} | answers


def _text(where: str, record: dict, key: str) -> str:
    if not isinstance(record[key], str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


def _conversation(where: str, record: dict) -> tuple[list[dict[str, str]], dict[str, str]]:
    """TRL's conversational pair: `prompt` (messages ending with the user's turn) and each answer as a list of one
    assistant message; or, without `prompt`, two whole conversations that differ only in their last (assistant)
    turn, the turns before it the prompt."""
    turns = {}
    for key in ANSWERS:
        if not isinstance(record[key], list) or not record[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty list of messages")
        turns[key] = record[key]
    if "prompt" in record:
        prompt = chat.conversation(where, {"messages": record["prompt"]}, MESSAGES, request=True)
        before = {key: [] for key in ANSWERS}
    else:
        before = {key: turns[key][:-1] for key in ANSWERS}
        if not before["chosen"] or before["chosen"] != before["rejected"]:
            raise UserError(f"{where}: without 'prompt', 'chosen' and 'rejected' must share every turn but their last")
        prompt = chat.conversation(where, {"messages": before["chosen"]}, MESSAGES, request=True)
    answers = {}
    for key in ANSWERS:
        rest = turns[key][len(before[key]) :]
        last = rest[-1]
        if len(rest) != 1 or not isinstance(last, dict) or last.get("role") != chat.ASSISTANT:
            raise UserError(f"{where}: '{key}' must end in one assistant message answering the prompt")
        if not isinstance(last.get("content"), str):
            raise UserError(f"{where}: '{key}': the answer's 'content' must be a string")
        answers[key] = last["content"]
    return prompt, answers


def request(row: dict[str, Any]) -> dict[str, Any]:
    """A row's prompt as `chat.render_prompt` takes a request."""
    if row["messages"]:
        return {"messages": json.loads(row["messages"])}
    return {"prompt": row["prompt"]} if row["prompt"] else {"instruction": row["instruction"], "input": row["input"]}


def degenerate(row: dict[str, str]) -> bool:
    """A pair that teaches nothing: both answers the same (whitespace aside), or one of them empty."""
    chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
    return not chosen or not rejected or chosen == rejected


def as_dataset(split: Dataset, prompts: list[str]) -> Dataset:
    """TRL's standard preference format: the prompt rendered in the run's template, the two answers as given (TRL
    ends each with EOS, so that the answers it compares are whole)."""
    return Dataset.from_dict({"prompt": prompts, "chosen": split["chosen"], "rejected": split["rejected"]})
