"""Data files: where they are found (a flag, a data folder, or the copy shipped with lora_ft), how they are parsed,
balanced and split."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from ..core.errors import UserError
from ..core.files import ASSETS, GB, MAX_INPUT_BYTES, MAX_RECORD_BYTES, checked, lines, parse_json, read_bytes

log = logging.getLogger("lora_ft")

DATA_DIR_ENV = "LORA_FT_DATA_DIR"
SPLITS = ("train", "val", "test")
CLASSIFICATION_FRACTIONS = (0.7, 0.1, 0.2)
INSTRUCTION_FRACTIONS = (0.85, 0.05, 0.1)


@dataclass(frozen=True)
class KnownDataset:
    """A public data file lora_ft ships (lora_ft/assets/<relpath>, see the README there): where it lives under a data
    folder and what it hashes to."""

    relpath: str
    sha256: str

    @property
    def bundled(self) -> Path:
        return ASSETS / self.relpath


SMS_SPAM = KnownDataset(
    relpath="sms_spam_collection/SMSSpamCollection",
    sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
)
INSTRUCTION_DATA = KnownDataset(
    relpath="instruction_data/instruction-data.json",
    sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
)

PREFERENCE_DATA = KnownDataset(
    relpath="preference_data/instruction-data-with-preference.json",
    sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
)


def resolve_data_file(known: KnownDataset, path: str | None = None) -> Path:
    """`path` if given; else $LORA_FT_DATA_DIR/<relpath> if it is there; else the copy shipped with lora_ft, checked
    against its sha256."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            raise UserError(f"{p}: a folder, not a data file")
        if p.exists() and not p.is_file():  # its sha256 goes in the run record, then it is read: it must read twice
            raise UserError(f"{p}: not a regular file (a pipe or device cannot be read twice); save it to a file first")
        if not p.is_file():
            raise UserError(f"{p}: data file not found")
        return p.resolve()
    if os.environ.get(DATA_DIR_ENV):
        p = Path(os.environ[DATA_DIR_ENV]) / known.relpath
        if p.is_file():
            return p.resolve()
    if not known.bundled.is_file():
        raise UserError(f"{known.bundled}: missing from this installation of lora_ft; reinstall it or pass `data` PATH")
    return checked(known.bundled, known.sha256)


def read_input(spec: str, stdin_name: str = "<stdin>") -> tuple[Path, str]:
    """A file of inputs to answer (`predict --file`, `generate --file`), or standard input for "-": its name (a
    suffix tells the format) and its text."""
    if spec == "-":
        text = _utf8(lambda: sys.stdin.read(MAX_INPUT_BYTES + 1), stdin_name)
        if len(text) > MAX_INPUT_BYTES:
            raise UserError(f"{stdin_name}: more than the {MAX_INPUT_BYTES / GB:.2g} GB a file of inputs may be")
        return Path(stdin_name), text
    try:
        return Path(spec), read_bytes(Path(spec), MAX_INPUT_BYTES, "file of inputs").decode("utf-8")
    except OSError as e:
        raise UserError(f"{spec}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{spec}: cannot read ({e})") from None


def input_lines(spec: str) -> Iterator[str]:
    """The lines of a file of texts (`predict --file`), or of standard input for "-", read as they are needed, so
    that a file of a million texts is never held whole. Split at \\n only, as `files.lines` splits; a line that is
    not UTF-8, or longer than a record may be, is refused in one line naming the file and line."""
    name, stdin = ("<stdin>", getattr(sys.stdin, "buffer", None)) if spec == "-" else (spec, None)
    if spec == "-" and stdin is None:  # a text stream (a test's StringIO): its lines are already text
        yield from (line.removesuffix("\n").removesuffix("\r") for line in sys.stdin)
        return
    try:
        stream = stdin or open(spec, "rb")  # noqa: SIM115 (closed below, unless it is stdin)
    except OSError as e:
        raise UserError(f"{spec}: cannot read ({e.strerror})") from None
    try:
        for number, raw in enumerate(iter(lambda: stream.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if len(raw) > MAX_RECORD_BYTES:
                raise UserError(f"{name}: line {number} is over the {MAX_RECORD_BYTES >> 20} MB a text may be")
            try:
                yield raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError:
                raise UserError(f"{name}: line {number} is not UTF-8 text (binary input?)") from None
    finally:
        if stream is not stdin:
            stream.close()


def typed_lines(read: Callable[[], str]) -> Iterator[str]:
    """The lines a person types (`chat`: `read` is `input` with its prompt), up to an empty line or the end of input;
    bytes that are not UTF-8 (a binary file piped in) stop it with a one-line error."""
    try:
        while (line := _utf8(read, "<stdin>")).strip():
            yield line
    except EOFError:
        return


def _utf8(read: Callable[[], str], name: str) -> str:
    """What `read` returns from standard input, refused in one line unless UTF-8. Python decodes stdin strictly
    (UnicodeDecodeError) or, in the C and POSIX locales, with surrogateescape: the bytes come back as lone surrogates
    that would fail later, in the tokenizer or in JSON."""
    try:
        text = read()
        text.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise UserError(f"{name}: not UTF-8 text (binary input?)") from None
    return text


# --- labelled text (classification) -------------------------------------------------------------------


def read_text(path: Path) -> str:
    try:
        data = read_bytes(path, MAX_INPUT_BYTES, "data file")
    except OSError as e:
        raise UserError(f"{path}: cannot read data file ({e.strerror})") from None
    if not data.strip():
        raise UserError(f"{path}: data file is empty")
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise UserError(f"{path}: a binary file, not text (NUL byte on line {line})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text") from None


def _checked_row(path: Path, where: str, label: str, text: str) -> tuple[str, str]:
    if not label.strip():
        raise UserError(f"{path}: {where} has an empty label")
    if not text.strip():
        raise UserError(f"{path}: {where} has an empty text")
    return label, text


def _label_text(path: Path, where: str, value: object) -> str:
    """A table's label as text. JSON gives types: an integer is its decimal string (0 and "0" are one class); a bool,
    float, list or object is refused, since `false` would become "False" beside a "0", and 1.0 "1.0" beside a "1"."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{path}: {where}: 'label' must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _label_text_lines(path: Path, text: str) -> list[tuple[str, str]]:
    """`label<TAB>text` per line, split on the first tab only: messages contain quotes and tabs."""
    rows = []
    for number, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(f"{path}: line {number} has no tab between label and text")
        label, message = line.split("\t", 1)
        rows.append(_checked_row(path, f"line {number}", label, message))
    return rows


def json_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) for a `.json` list of objects or a `.jsonl` file of one object per line."""
    if path.suffix.lower() == ".json":
        try:
            items = parse_json(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: a .json data file holds a list of objects, got a {type(items).__name__}")
        numbered = list(enumerate(items, start=1))
        where = "item"
    else:  # JSON Lines
        numbered = []
        for number, line in enumerate(lines(text), start=1):
            if line.strip():
                try:
                    numbered.append((number, parse_json(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {number} is not JSON ({e.msg})") from None
        where = "line"
    for number, record in numbered:
        if not isinstance(record, dict):
            raise UserError(f"{path}: {where} {number} is not a JSON object")
    return numbered


def _table_rows(path: Path, text: str) -> list[tuple[str, str]]:
    """Rows of a CSV/TSV with a header naming `text` and `label` columns, or of a JSON list / JSONL file."""
    if path.suffix.lower() in (".jsonl", ".json"):
        records = json_records(path, text)
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            records = [(number, record) for number, record in enumerate(reader, start=2)]
        except csv.Error as e:  # a field over csv's limit (131,072 characters), a stray quote at the end
            kind = "TSV" if delimiter == "\t" else "CSV"
            # line_num counts the lines read before the one that failed
            raise UserError(f"{path}: line {reader.line_num + 1} is not {kind} ({e})") from None
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise UserError(f"{path}: needs a header with 'text' and 'label' columns, got {reader.fieldnames}")
    rows = []
    where = "item" if path.suffix.lower() == ".json" else "line"
    for number, record in records:
        missing = [k for k in ("text", "label") if record.get(k) is None]
        if missing:
            raise UserError(f"{path}: {where} {number} has no '{missing[0]}'")
        if not isinstance(record["text"], str):
            raise UserError(f"{path}: {where} {number}: 'text' must be a string, got {type(record['text']).__name__}")
        label = _label_text(path, f"{where} {number}", record["label"])
        rows.append(_checked_row(path, f"{where} {number}", label, record["text"]))
    return rows


def read_labeled(path: Path) -> list[tuple[str, str]]:
    """(label, text) pairs. `.csv`, `.jsonl` and `.tsv` with a text/label header are tables; any other file
    (the SMS Spam Collection has no extension) is `label<TAB>text` lines. Labels are stripped of surrounding
    whitespace, and labels that differ only in case are refused."""
    text = read_text(path)
    first_line = lines(text)[0].lower().split("\t")
    is_table = path.suffix.lower() in (".csv", ".jsonl", ".json") or (
        path.suffix.lower() == ".tsv" and {"text", "label"} <= {c.strip() for c in first_line}
    )
    rows = _stripped_labels(path, _table_rows(path, text) if is_table else _label_text_lines(path, text))
    _refuse_case_variants(path, Counter(label for label, _ in rows))
    if len({label for label, _ in rows}) < 2:
        raise UserError(f"{path}: needs at least two different labels, found {sorted({r[0] for r in rows})}")
    return rows


def _stripped_labels(path: Path, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Labels without their surrounding whitespace, in every format (`spam ` is `spam`), saying so when any had
    some: a silent rule would hide a file that is not what its author thinks."""
    padded = Counter(label for label, _ in rows if label != label.strip())
    if padded:
        example = next(iter(padded))
        log.warning(
            "%s: %d label%s had spaces around them, read without (%r as %r)",
            path, padded.total(), "s" if padded.total() > 1 else "", example, example.strip(),
        )  # fmt: skip
    return [(label.strip(), text) for label, text in rows]


def _refuse_case_variants(path: Path, counts: Counter[str]) -> None:
    """Labels that differ only in case (`spam`, `Spam`) would silently train as separate classes: refuse them,
    naming the first group's variants with their row counts (most rows first) and how many groups there are."""
    groups: dict[str, list[str]] = {}
    for label in counts:  # in the order the file first gives them
        groups.setdefault(label.casefold(), []).append(label)
    clashes = [group for group in groups.values() if len(group) > 1]
    if not clashes:
        return
    first = sorted(clashes[0], key=lambda label: -counts[label])
    named = ", ".join(f"{label!r} ({counts[label]} row{'s' if counts[label] != 1 else ''})" for label in first)
    more = f" (and {len(clashes) - 1} more such group{'s' if len(clashes) > 2 else ''})" if len(clashes) > 1 else ""
    raise UserError(f"{path}: labels differ only in case: {named}{more}; make them identical")


def split_indices(
    n: int, fractions: tuple[float, ...], rng: np.random.Generator, source: str | Path = "data"
) -> list[np.ndarray]:
    """Shuffle 0..n-1 and cut it by `fractions`; the last split takes the remainder. Every split must get a row;
    `source` names the data in the error when one would not."""
    order = rng.permutation(n)
    cuts, start = [], 0
    for fraction in fractions[:-1]:
        cuts.append(order[start : start + int(n * fraction)])
        start += int(n * fraction)
    cuts.append(order[start:])
    if min(len(c) for c in cuts) == 0:
        raise UserError(f"{source}: {n} rows are too few for a {'/'.join(str(f) for f in fractions)} split")
    return cuts


def classification_splits(
    rows: list[tuple[str, str]],
    seed: int,
    balance: bool,
    fractions: tuple[float, float, float] = CLASSIFICATION_FRACTIONS,
    source: str | Path = "data",
) -> DatasetDict:
    """Balance (undersample every class to the smallest one) and split train/val/test; `seed` fixes both."""
    names = sorted({label for label, _ in rows})
    labels = np.array([names.index(label) for label, _ in rows])
    rng = np.random.default_rng(seed)
    keep = np.arange(len(rows))
    if balance:
        smallest = min(np.bincount(labels))
        per_class = [rng.choice(np.flatnonzero(labels == c), smallest, replace=False) for c in range(len(names))]
        keep = np.sort(np.concatenate(per_class))
    parts = split_indices(len(keep), fractions, rng, source)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [rows[i][1] for i in keep[part]], "label": labels[keep[part]].tolist()}, features=features
            )
            for split, part in zip(SPLITS, parts, strict=True)
        }
    )


# --- instructions (instruction tuning) ------------------------------------------------------------------

PROMPT_INTRO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the one template, used for training, evaluation and `generate`."""
    prompt = f"{PROMPT_INTRO}\n\n### Instruction:\n{instruction}"
    if input.strip():
        prompt += f"\n\n### Input:\n{input}"
    return prompt + "\n\n### Response:\n"


def _string_field(path: Path, where: str, record: dict, key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise UserError(f"{path}: {where} has no '{key}'")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{path}: {where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _instruction_row(path: Path, where: str, record: dict, with_output: bool) -> dict[str, str]:
    """{instruction, input, prompt[, output]} from an object with `instruction` (+ `input`) or a raw `prompt`."""
    if "prompt" in record and "instruction" not in record:
        row = {"instruction": "", "input": "", "prompt": _string_field(path, where, record, "prompt", required=True)}
        output_key = "completion"
    else:
        instruction = _string_field(path, where, record, "instruction", required=True)
        if not instruction.strip():
            raise UserError(f"{path}: {where} has an empty 'instruction'")
        input = _string_field(path, where, record, "input", required=False)
        row = {"instruction": instruction, "input": input, "prompt": format_prompt(instruction, input)}
        output_key = "output"
    if with_output:
        row["output"] = _string_field(path, where, record, output_key, required=True)
    return row


def _instruction_records(path: Path, text: str, with_output: bool) -> list[dict[str, str]]:
    return instruction_rows(path, json_records(path, text), with_output)


def record_word(path: Path) -> str:
    """What errors call a record of `path`: an item of a .json list, a line of a .jsonl file."""
    return "item" if path.suffix.lower() == ".json" else "line"


def instruction_rows(path: Path, records: list[tuple[int, dict]], with_output: bool) -> list[dict[str, str]]:
    """Rows of {instruction, input, prompt[, output]} from `json_records`' numbered objects."""
    if not records:
        raise UserError(f"{path}: holds no examples")
    return [_instruction_row(path, f"{record_word(path)} {number}", record, with_output) for number, record in records]


def read_instructions(path: Path) -> list[dict[str, str]]:
    """Rows of {instruction, input, output, prompt} from a .json list or .jsonl file of objects with
    `instruction`, optional `input` and `output` (prompt = the Alpaca template), or with `prompt` and
    `completion` (prompt used as it is; instruction and input left empty)."""
    return _instruction_records(path, read_text(path), with_output=True)


def as_given(row: dict[str, str]) -> dict[str, str]:
    """A row as its data file gave it: `instruction` and `input`, or the raw `prompt`."""
    return (
        {"instruction": row["instruction"], "input": row["input"]} if row["instruction"] else {"prompt": row["prompt"]}
    )


def read_requests(path: Path, text: str) -> list[dict[str, str]]:
    """What `generate --file` answers: objects with `instruction` (+ `input`) or `prompt`; other keys (an
    `output`, a `model_response`) are ignored, so a test_responses.json can be fed back in."""
    return [as_given(row) for row in _instruction_records(path, text, with_output=False)]


def instruction_splits(
    rows: list[dict[str, str]],
    seed: int,
    fractions: tuple[float, float, float] = INSTRUCTION_FRACTIONS,
    source: str | Path = "data",
) -> DatasetDict:
    """Shuffle and split train/val/test; `seed` fixes it (935/55/110 for the course's 1,100 examples)."""
    parts = split_indices(len(rows), fractions, np.random.default_rng(seed), source)
    return DatasetDict(
        {split: Dataset.from_list([rows[i] for i in part]) for split, part in zip(SPLITS, parts, strict=True)}
    )
