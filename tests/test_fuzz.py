"""Property-based tests of every reader of user files: data files, request files, manifests, recipes and run records.
Whatever the bytes, a reader returns its result or raises a one-line UserError; any other exception would reach the
user as an "internal error". Inputs are random, or valid files mutated (characters inserted, deleted and replaced,
NUL bytes, invalid UTF-8, BOMs, line separators, deep nesting, huge fields, wrong JSON types at a key)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ft import data
from lora_ft.core import report
from lora_ft.core.config import RECIPES_DIR, RunConfig, load_config
from lora_ft.core.errors import UserError
from lora_ft.core.files import MANIFEST_NAME as FILENAME
from lora_ft.core.manifest import Manifest
from lora_ft.data import chat
from lora_ft.engine import adapter_config, adapters, runs

# Deterministic (the same examples on every run, nothing saved between runs) and bounded: the file runs in well
# under a minute on 2 cores.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FEWER = settings(FUZZ, max_examples=150)

WORK = Path(tempfile.mkdtemp(prefix="lora_ft-fuzz-"))  # hypothesis and function-scoped tmp_path do not mix


@pytest.fixture(scope="module", autouse=True)
def _remove_work_folder():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


# --- valid files to start from ----------------------------------------------------------------------------------

SMS_LINES = data.SMS_SPAM.bundled.read_text(encoding="utf-8").split("\n")[:30]
SMS_ROWS = [tuple(line.split("\t", 1)) for line in SMS_LINES]


def _table(delimiter: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerows([("label", "text"), *SMS_ROWS])
    return out.getvalue()


SMS_RECORDS = [{"text": text, "label": label} for label, text in SMS_ROWS]
LABELED = {  # file name -> valid contents
    "SMSSpamCollection": "\n".join(SMS_LINES) + "\n",
    "x.tsv": _table("\t"),
    "x.csv": _table(","),
    "x.json": json.dumps(SMS_RECORDS, indent=1),
    "x.jsonl": "".join(json.dumps(r) + "\n" for r in SMS_RECORDS),
}
INSTRUCTION_RECORDS = [
    *json.loads(data.INSTRUCTION_DATA.bundled.read_text(encoding="utf-8"))[:6],
    {"prompt": "Say hi.", "completion": "Hi."},
]
INSTRUCTIONS = {
    "x.json": json.dumps(INSTRUCTION_RECORDS, indent=4),
    "x.jsonl": "".join(json.dumps(r) + "\n" for r in INSTRUCTION_RECORDS),
}
CHAT_RECORDS = [  # OpenAI-style in one file, ShareGPT in the other
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}]},
]  # fmt: skip
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT_RECORDS = [
    {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in r["messages"]]}
    for r in CHAT_RECORDS
]
CHATS = {
    "c.json": (json.dumps(CHAT_RECORDS, indent=2), CHAT_RECORDS),
    "c.jsonl": ("".join(json.dumps(r) + "\n" for r in SHAREGPT_RECORDS), SHAREGPT_RECORDS),
}
BASE = {
    "spec": "gpt2",
    "kind": "hub",
    "location": "openai-community/gpt2",
    "gguf_file": None,
    "revision": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "model_type": "gpt2",
    "hidden_size": 768,
    "num_layers": 12,
    "num_parameters": 124734720,
}
MANIFEST = {
    "task": "spam",
    "created": "2025-01-02T03:04:05+00:00",
    "config": RunConfig(model="gpt2").to_dict(),
    "base": BASE,
    "lora": {"target_modules": ["c_attn", "c_proj", "c_fc"], "trainable_parameters": 1181184},
    "data": {
        "path": "/nowhere/SMSSpamCollection",
        "sha256": "0" * 64,
        "seed": 123,
        "fractions": [0.7, 0.1, 0.2],
        "split_sizes": {"train": 1045, "val": 149, "test": 300},
    },
    "metrics": {"test": {"accuracy": 0.97, "loss": 0.1, "confusion_matrix": [[1, 0], [0, 1]]}},
    "training": {"steps": 60, "seconds": 12.5, "precision": "fp32", "log_history": [{"loss": 0.5, "step": 10}]},
    "versions": {"python": "3.11.7", "lora_ft": "0.1.0"},
    "labels": {"ham": 0, "spam": 1},
}
MERGED = MANIFEST | {"merge": {"created": "2025-02-03T04:05:06+00:00", "base": BASE, "dtype": "float32"}}
RUN_RECORD = {
    "task": "spam",
    "started": "2025-01-02T03:04:05+00:00",
    "output": "adapters/run",
    "config": RunConfig(model="gpt2").to_dict(),
    "data": {"path": "/nowhere/SMSSpamCollection", "sha256": "0" * 64},
    "base": BASE,
}
RECIPES = {task: (RECIPES_DIR / f"{task}.yaml").read_text(encoding="utf-8") for task in ("spam", "instruct")}

# --- strategies -------------------------------------------------------------------------------------------------

# Pieces that break parsers: NUL, invalid UTF-8, BOMs, line separators (U+2028, U+2029, U+0085, form feed), quotes
# and brackets, nesting far deeper than Python's recursion limit, a field over csv's limit, an integer over Python's
# 4,300 digits, JSON's non-finite numbers, YAML's tags, anchors and documents.
SNIPPETS = [
    b"\0",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    "\u2028".encode(),
    "\u2029".encode(),
    "\x85".encode(),
    b"\x0c",
    b"\r",
    b"\n",
    b"\r\n",
    b"\t",
    b'"',
    b"'",
    b",",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"NaN",
    b"-Infinity",
    b"1" * 5000,
    b"[" * 50_000,
    b"{" * 30_000,
    b'{"a":' * 20_000,
    b"x" * 200_000,
    b"&a ",
    b"*a",
    b"!!binary ",
    b"!!python/object:os.system ",
    b"? ",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"- ",
    b"~",
    b".nan",
    b"0x" + b"f" * 5000,
    b"2001-12-14",
]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with a few edits: a snippet or random bytes inserted, a span deleted, replaced or repeated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        end = min(len(data), at + draw(st.integers(0, 64)))
        edit = draw(st.sampled_from(["snippet", "bytes", "delete", "replace", "repeat", "truncate"]))
        if edit == "snippet":
            data[at:at] = draw(st.sampled_from(SNIPPETS))
        elif edit == "bytes":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at:end]
        elif edit == "replace":
            data[at:end] = draw(st.binary(max_size=8))
        elif edit == "repeat":
            data[at:at] = data[at:end] * draw(st.integers(2, 50))
        else:
            del data[at:]
    return bytes(data)


# JSON values of every type, and raw JSON text that json.dumps cannot write (deep nesting, huge numbers)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
RAW_JSON = ["[" * 50_000 + "]" * 50_000, '{"a":' * 20_000 + "1" + "}" * 20_000, "1" * 5000, "NaN", "-Infinity"]
RAW = "\0raw:"  # a string json.dumps writes as "\u0000raw:N", swapped for RAW_JSON[N] afterwards


@st.composite
def key_paths(draw: st.DrawFn, value: Any) -> tuple:
    """A key path into `value`: down through dict keys (and the first items of lists), going one level deeper three
    times in four, so that every top-level key is drawn often and nested ones too."""
    path: tuple = ()
    while isinstance(value, (dict, list)) and value and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(list(value) if isinstance(value, dict) else range(min(3, len(value)))))
        path, value = (*path, key), value[key]
    return path


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    """`value` with the item at `path` replaced by `new` (deleted, for the `...` marker)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    if len(path) == 1 and new is ...:
        del copy[path[0]]
    else:
        copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def retyped_json(draw: st.DrawFn, valid: Any, lines: bool = False) -> bytes:
    """`valid` (a JSON value) with the value at one key path replaced by one of another type, deleted, or given a
    new key beside it; as JSON, or as JSON Lines when `lines` (a list)."""
    path = draw(key_paths(valid))
    new = draw(st.just(...) | JSON_VALUES | st.sampled_from([f"{RAW}{i}" for i in range(len(RAW_JSON))]))
    if new is ... and not path:
        new = None
    value = _replaced(valid, path, new)
    if draw(st.booleans()) and isinstance(value, dict):
        value = value | {draw(st.text(max_size=8)): draw(JSON_VALUES)}
    text = "".join(json.dumps(v) + "\n" for v in value) if lines and isinstance(value, list) else json.dumps(value)
    for i, raw in enumerate(RAW_JSON):
        text = text.replace(json.dumps(f"{RAW}{i}"), raw)
    return text.encode("utf-8", "surrogatepass")


def contents(valid: str, structured: Any = None, lines: bool = False) -> st.SearchStrategy[bytes]:
    """Random bytes, random text, `valid` mutated, and (for JSON) `structured` with a key retyped."""
    options = [
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        mutated(valid.encode()),
    ]
    if structured is not None:  # twice: most bugs are in what a reader does with a value of the wrong type
        options += [retyped_json(structured, lines)] * 2
    return st.one_of(options)


def _outcome(read: Callable[[], Any]) -> Any:
    """What `read` returns, or None when it raised a one-line UserError; any other exception fails the test."""
    try:
        return read()
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, f"not one line: {message[:500]!r}"
        return None


def _write(name: str, content: bytes) -> Path:
    path = WORK / name
    path.write_bytes(content)
    return path


# --- data files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LABELED))
def test_valid_seeds_parse(name: str) -> None:
    assert len(data.read_labeled(_write(name, LABELED[name].encode()))) == 30
    if name in INSTRUCTIONS:
        assert len(data.read_instructions(_write(name, INSTRUCTIONS[name].encode()))) == 7
        assert len(data.read_requests(Path(name), INSTRUCTIONS[name])) == 7


@pytest.mark.parametrize("name", list(CHATS))
def test_valid_chat_seeds_parse(name: str) -> None:
    rows = chat.read_examples(_write(name, CHATS[name][0].encode()))
    assert [row["messages"] for row in rows] == [r["messages"] for r in CHAT_RECORDS]


@pytest.mark.parametrize("name", list(LABELED))
@FUZZ
@given(content=st.data())
def test_labeled_data_files(name: str, content: st.DataObject) -> None:
    structured = SMS_RECORDS if name.startswith("x.json") else None
    raw = content.draw(contents(LABELED[name], structured, lines=name.endswith("l")))
    rows = _outcome(lambda: data.read_labeled(_write(name, raw)))
    if rows is not None:
        assert len({label for label, _ in rows}) >= 2
        assert all(isinstance(label, str) and label == label.strip() and label for label, _ in rows)
        assert all(isinstance(text, str) and text.strip() for _, text in rows)


@pytest.mark.parametrize("name", list(INSTRUCTIONS))
@FUZZ
@given(content=st.data())
def test_instruction_files(name: str, content: st.DataObject) -> None:
    raw = content.draw(contents(INSTRUCTIONS[name], INSTRUCTION_RECORDS, lines=name.endswith("l")))
    rows = _outcome(lambda: data.read_instructions(_write(name, raw)))
    if rows is not None:
        assert rows and all(isinstance(row[key], str) for row in rows for key in ("prompt", "output"))


@pytest.mark.parametrize("name", list(INSTRUCTIONS))
@FUZZ
@given(content=st.data())
def test_request_files(name: str, content: st.DataObject) -> None:
    raw = content.draw(contents(INSTRUCTIONS[name], INSTRUCTION_RECORDS, lines=name.endswith("l")))
    text = raw.decode("utf-8", "replace")  # read_requests is given text: the CLI has decoded it
    requests = _outcome(lambda: data.read_requests(Path(name), text))
    if requests is not None:
        assert requests and all(set(r) in ({"instruction", "input"}, {"prompt"}) for r in requests)


@pytest.mark.parametrize("name", list(CHATS))
@FUZZ
@given(content=st.data())
def test_chat_files(name: str, content: st.DataObject) -> None:
    valid, records = CHATS[name]
    raw = content.draw(contents(valid, records, lines=name.endswith("l")))
    rows = _outcome(lambda: chat.read_examples(_write(name, raw)))
    for messages in [row["messages"] for row in rows or [] if "messages" in row]:  # else: instruction records
        assert messages[-1]["role"] == "assistant"
        assert all(m["role"] in chat.ROLES and isinstance(m["content"], str) and m["content"].strip() for m in messages)
    _outcome(lambda: chat.read_requests(Path(name), raw.decode("utf-8", "replace")))


# --- manifests, the adapters listing, run records ---------------------------------------------------------------

MANIFESTS = {"adapter": MANIFEST, "merged": MERGED}


@pytest.mark.parametrize("kind", list(MANIFESTS))
@FUZZ
@given(content=st.data())
def test_manifests(kind: str, content: st.DataObject) -> None:
    valid = MANIFESTS[kind]
    raw = content.draw(contents(json.dumps(valid, indent=2), valid))
    folder = WORK / "adapter"
    folder.mkdir(exist_ok=True)
    _write(f"adapter/{FILENAME}", raw)
    manifest = _outcome(lambda: Manifest.read(folder))
    if manifest is not None:
        assert isinstance(manifest.task, str) and isinstance(manifest.config, dict)
    listed = adapters.describe_folder(folder)  # never raises: a manifest it cannot read is a row with a problem
    _check_listed(listed)
    if manifest is None:
        assert listed.problem


def _check_listed(listed: adapters.Listed) -> None:
    """A listing row has the types the table and --json print; a problem is one line."""
    for field in ("task", "base", "created", "metric", "problem"):
        assert getattr(listed, field) is None or isinstance(getattr(listed, field), str), field
    assert listed.value is None or isinstance(listed.value, (int, float))
    assert listed.problem is None or "\n" not in listed.problem


@FEWER
@given(
    manifests=st.lists(st.sampled_from([MANIFEST, MERGED]).flatmap(lambda m: contents(json.dumps(m), m)), max_size=3),
    record=contents(json.dumps(RUN_RECORD), RUN_RECORD),
    state=contents(json.dumps({"global_step": 10}), {"global_step": 10}),
)
def test_the_listing_never_fails(manifests: list[bytes], record: bytes, state: bytes) -> None:
    root = WORK / "adapters"
    shutil.rmtree(root, ignore_errors=True)
    for i, raw in enumerate([json.dumps(MANIFEST).encode(), *manifests]):
        (root / f"a{i}").mkdir(parents=True)
        (root / f"a{i}" / FILENAME).write_bytes(raw)
    run = root / f".run{runs.PARTIAL}"
    (run / runs.CHECKPOINTS / "checkpoint-10").mkdir(parents=True)
    (run / runs.RUN_RECORD).write_bytes(record)
    (run / runs.CHECKPOINTS / "checkpoint-10" / "trainer_state.json").write_bytes(state)
    found = adapters.list_adapters(root)
    assert len(found) == len(manifests) + 2
    for listed in found:
        _check_listed(listed)
    # what `adapters` and `adapters --json` print
    assert report.listing(found) and json.dumps([asdict(listed) for listed in found])


@FUZZ
@given(content=st.data())
def test_run_records(content: st.DataObject) -> None:
    folder = WORK / f".run{runs.PARTIAL}"
    folder.mkdir(exist_ok=True)
    _write(f".run{runs.PARTIAL}/{runs.RUN_RECORD}", content.draw(contents(json.dumps(RUN_RECORD), RUN_RECORD)))
    record = _outcome(lambda: runs.read_run_record(folder))
    if record is not None:
        assert isinstance(record, dict) and isinstance(record["config"], dict)


# --- recipes ------------------------------------------------------------------------------------------------------

RECIPE_VALUES = JSON_VALUES | st.sampled_from(
    [float("nan"), float("inf"), -1, 0, 2**32, 1e-300, "4bit", "bf16", "spam", "instruct", ["c_attn"], [], {}]
)


class Raw(str):
    """YAML text written as it is, in place of a value."""


# YAML that json.dumps cannot write: tags, anchors and aliases, YAML 1.1's other numbers and dates, block scalars,
# deep nesting, scalars PyYAML fails to construct with other errors than YAMLError, an alias bomb.
RAW_YAML = [
    "[" * 2_000,  # PyYAML takes most of a second to fail on it, however deep
    "{a: " * 20_000,
    "&a [*a]",
    "*undefined",
    "!!binary AAAA",
    "!!python/object/apply:os.system [echo]",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "2001-12-14 21:59:43.10",
    "1.0e99999",
    ".nan",
    "-.inf",
    "0o17",
    "0b101",
    "1_000",
    "1:20",
    "~",
    "|\n  block\n  text",
    "? a",
    "{<<: {lr: 1}}",
    "!!int abc",
    "!!float abc",
    "!!bool abc",
    "!!timestamp abc",
    "2001-02-30",
    "1" * 5000,
]


@st.composite
def retyped_recipe(draw: st.DrawFn, task: str) -> bytes:
    """The task's recipe with one key's value replaced (by one of any type or raw YAML) or deleted, or an unknown
    key added; written by PyYAML, as JSON, or line by line when the value is raw YAML."""
    values = yaml.safe_load(RECIPES[task])
    key = draw(st.sampled_from([*values, "unknown", ""]))
    value = draw(RECIPE_VALUES | st.just(...) | st.sampled_from(RAW_YAML).map(Raw))
    values = {k: v for k, v in (values | {key: value}).items() if v is not ...}
    if isinstance(value, Raw):
        text = "".join(f"{k}: {v if isinstance(v, Raw) else json.dumps(v)}\n" for k, v in values.items())
    else:
        text = draw(st.sampled_from([yaml.safe_dump(values), json.dumps(values)]))
    return text.encode("utf-8", "surrogatepass")


def recipe_files(task: str) -> st.SearchStrategy[bytes]:
    return st.one_of(contents(RECIPES[task]), retyped_recipe(task), retyped_recipe(task))


@pytest.mark.parametrize("task", ["spam", "instruct"])
@settings(FUZZ, max_examples=250)
@given(content=st.data())
def test_recipes(task: str, content: st.DataObject) -> None:
    suffix = content.draw(st.sampled_from([".yaml", ".json"]))
    path = _write(f"recipe{suffix}", content.draw(recipe_files(task)))
    overrides = content.draw(st.sampled_from([None, {"model": "gpt2"}, {"lr": 1e-3, "seed": 1}]))
    config = _outcome(lambda: load_config(task, path, overrides))
    if config is not None:
        assert config.task == task


# --- what the fuzzing found, as plain tests -------------------------------------------------------------------------


def _manifest_folder(name: str, manifest: Any) -> Path:
    folder = WORK / "found" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILENAME).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("manifest", "refused"),
    [
        ('{"task": ' + "1" * 5000 + "}", "not valid JSON (an integer with too many digits"),  # was a ValueError
        (MANIFEST | {"task": {}}, "'task' must be a string, got dict"),  # was accepted as the task
        (MANIFEST | {"config": "spam"}, "'config' must be an object, got str"),
        (MERGED | {"merge": []}, "'merge' must be an object, got list"),
    ],
    ids=["huge-integer", "task-object", "config-string", "merge-list"],
)
def test_a_manifest_of_the_wrong_shape_is_refused(manifest: Any, refused: str) -> None:
    folder = _manifest_folder("shape", manifest)
    with pytest.raises(UserError, match=f"^{re.escape(str(folder / FILENAME))}: {re.escape(refused)}"):
        Manifest.read(folder)


def test_a_manifest_with_only_the_required_sections_is_read() -> None:
    required = {key: MANIFEST[key] for key in Manifest.REQUIRED} | {"labels": None}
    assert Manifest.read(_manifest_folder("minimal", required)) == required


LISTING_BREAKERS = {  # each made `adapters` fail: a TypeError sorting by `created`, or printing the table
    "merge-created-number": (
        MERGED | {"merge": MERGED["merge"] | {"created": 5}},
        None,
        "unexpected content (TypeError: ",
    ),
    "base-spec-number": (MANIFEST | {"base": BASE | {"spec": 5}}, None, "unexpected content (TypeError: "),
    "run-started-number": (MANIFEST, RUN_RECORD | {"started": 5}, "unexpected content (TypeError: "),
    "run-task-list": (MANIFEST, RUN_RECORD | {"task": ["spam"]}, "not a run record ('task' must be a string)"),
    # an AttributeError, which the listing did not catch
    "run-base-null": (MANIFEST, RUN_RECORD | {"base": None}, "not a run record ('base' must be an object)"),
}


@pytest.mark.parametrize("case", list(LISTING_BREAKERS))
def test_the_listing_shows_a_manifest_or_run_record_of_the_wrong_shape_as_unreadable(case: str) -> None:
    manifest, record, problem = LISTING_BREAKERS[case]
    root = WORK / "found" / case
    for name in ("good", "odd"):
        _manifest_folder(f"{case}/{name}", MERGED if name == "good" else manifest)
    if record is not None:
        (root / f".odd{runs.PARTIAL}").mkdir()
        (root / f".odd{runs.PARTIAL}" / runs.RUN_RECORD).write_text(json.dumps(record))
    found = adapters.list_adapters(root)
    problems = [listed.problem for listed in found if listed.problem]
    assert len(problems) == 1 and problem in problems[0], problems
    assert report.listing(found)[-1].startswith("unreadable: ")


@pytest.mark.parametrize(
    "recipe",
    [
        "epochs: " + "1" * 5000,  # was a ValueError: int() over 4,300 digits
        "epochs: !!int abc",  # ValueError
        "lr: !!float abc",  # ValueError
        "output: 2001-02-30",  # ValueError: an untagged date that is not one
        "output: !!timestamp abc",  # AttributeError
        "balance: !!bool abc",  # KeyError
    ],
)
def test_a_recipe_scalar_pyyaml_cannot_construct_is_refused(recipe: str) -> None:
    path = _write("recipe.yaml", recipe.encode())
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: not valid YAML \(a value cannot be read: "):
        load_config("spam", path, {"model": "gpt2"})


def test_a_recipe_key_with_a_newline_is_named_on_one_line() -> None:
    with pytest.raises(UserError, match=r"unknown key 'a\\nb' \(known: ") as error:
        load_config("spam", _write("recipe.yaml", b'"a\\nb": 1\n'), {"model": "gpt2"})
    assert "\n" not in str(error.value)


def test_a_recipe_alias_bomb_is_refused_in_a_short_line() -> None:
    """Nine levels of nine aliases: 387 million strings if printed whole."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = f"lora_r: [{', '.join(levels)}]\n"
    with pytest.raises(UserError, match=r"'lora_r' must be ") as error:
        load_config("spam", _write("recipe.yaml", bomb.encode()), {"model": "gpt2"})
    assert len(str(error.value)) < 400


def test_listing_a_deeply_nested_trainer_state() -> None:
    """Read as incomplete (was a RecursionError that broke the whole listing)."""
    root = WORK / "found" / "deep-state"
    checkpoint = root / f".run{runs.PARTIAL}" / runs.CHECKPOINTS / "checkpoint-1"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint.parent.parent / runs.RUN_RECORD).write_text(json.dumps(RUN_RECORD))
    (checkpoint / "trainer_state.json").write_text("[" * 50_000 + "]" * 50_000)
    [listed] = adapters.list_adapters(root)
    assert listed.kind == "interrupted" and listed.state is None and listed.problem is None


# --- adapter_config.json ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_copies(spam_run) -> dict[str, Path]:
    """Two copies of a trained classifier: one whose manifest records adapter_config.json's sha256, and one from
    before that was recorded (only the field checks and PEFT's own stand between an edit and the loaded model)."""
    copies = {}
    for kind in ("recorded", "unrecorded"):
        copies[kind] = shutil.copytree(spam_run[0].adapter_dir, WORK / f"adapter-config-{kind}")
    manifest = json.loads((copies["unrecorded"] / FILENAME).read_text())
    del manifest["lora"][adapter_config.CONFIG_SHA256]
    (copies["unrecorded"] / FILENAME).write_text(json.dumps(manifest))
    return copies


@pytest.mark.parametrize(("kind", "examples"), [("recorded", 150), ("unrecorded", 60)])
def test_adapter_configs(adapter_copies: dict[str, Path], kind: str, examples: int) -> None:
    """An edited adapter_config.json loads (it is the trained adapter) or is one line naming the file; PEFT never
    fails with its own exception. Fewer examples without the sha256: most of those load the model."""
    from lora_ft.tasks import classify

    folder = adapter_copies[kind]
    valid = json.loads((folder / adapter_config.FILENAME).read_text())

    @settings(FUZZ, max_examples=examples)
    @given(raw=contents(json.dumps(valid, indent=2), valid))
    def edited(raw: bytes) -> None:
        (folder / adapter_config.FILENAME).write_bytes(raw)
        try:
            loaded = classify.load(folder)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith(str(folder / adapter_config.FILENAME)), str(e)[:500]
            return
        if kind == "recorded":  # only the file training wrote gets past its sha256
            assert json.loads(raw) == valid
        assert loaded.model.peft_config["default"].peft_type == valid["peft_type"]

    edited()
