import hashlib
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from lora_ft import data
from lora_ft.core import files
from lora_ft.core.errors import UserError

from .conftest import DATA_DIR, GPT2_TOKENIZER

SMS = DATA_DIR / "sms_spam_collection" / "SMSSpamCollection"


def test_sms_file_parsed_on_first_tab_with_quotes_intact():
    rows = data.read_labeled(SMS)
    assert len(rows) == 5574
    assert Counter(label for label, _ in rows) == {"ham": 4827, "spam": 747}
    raw_lines = SMS.read_text(encoding="utf-8").splitlines()
    quoted = [i for i, line in enumerate(raw_lines) if '"' in line]
    assert quoted, "the real file has messages with quotes"
    for i in quoted:
        assert rows[i][1] == raw_lines[i].split("\t", 1)[1]


def test_balanced_split_sizes_and_seed():
    rows = data.read_labeled(SMS)
    splits = data.classification_splits(rows, seed=123, balance=True)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    labels = Counter(label for split in splits.values() for label in split["label"])
    assert labels == {0: 747, 1: 747}
    assert splits["train"].features["label"].names == ["ham", "spam"]
    texts = {k: v["text"] for k, v in splits.items()}
    assert texts == {k: v["text"] for k, v in data.classification_splits(rows, 123, True).items()}
    assert texts["test"] != data.classification_splits(rows, 124, True)["test"]["text"]


def test_unbalanced_split_keeps_every_row():
    rows = data.read_labeled(SMS)
    splits = data.classification_splits(rows, seed=1, balance=False)
    assert sum(len(s) for s in splits.values()) == 5574


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_user_tables_with_any_label_names(tmp_path: Path, suffix: str):
    examples = [('great, "really" great', "positive"), ("awful", "negative"), ("meh", "neutral")] * 10
    path = tmp_path / f"reviews{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in examples))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": t, "label": lab} for t, lab in examples], indent=1))
    else:
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["label", "text"])
            writer.writerows([(lab, t) for t, lab in examples])
    rows = data.read_labeled(path)
    assert rows[0] == ("positive", 'great, "really" great')
    splits = data.classification_splits(rows, seed=0, balance=True)
    assert splits["train"].features["label"].names == ["negative", "neutral", "positive"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ham\thello\nspam no tab here\n", "line 2 has no tab"),
        ("", "is empty"),
        ("ham\thello\nham\tbye\n", "at least two different labels"),
        ("ham\thello\nspam\t \n", "empty text"),
    ],
)
def test_bad_label_files(tmp_path: Path, content: str, message: str):
    path = tmp_path / "data.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        data.read_labeled(path)
    assert str(path) in str(error.value)


def test_csv_without_columns(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("sentence,category\nhi,a\n")
    with pytest.raises(UserError, match="'text' and 'label' columns"):
        data.read_labeled(path)


def test_not_utf8_names_line(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"ham\thello\nspam\t\xff\xfe win\n")
    with pytest.raises(UserError, match="line 2 is not UTF-8"):
        data.read_labeled(path)


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    flag, env = tmp_path / "flag.txt", tmp_path / "env"
    (env / "sms_spam_collection").mkdir(parents=True)
    (env / data.SMS_SPAM.relpath).write_text("x")
    flag.write_text("x")
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(env))
    assert data.resolve_data_file(data.SMS_SPAM, str(flag)) == flag.resolve()
    assert data.resolve_data_file(data.SMS_SPAM) == (env / data.SMS_SPAM.relpath).resolve()
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(tmp_path / "nowhere"))
    assert data.resolve_data_file(data.SMS_SPAM) == data.SMS_SPAM.bundled
    monkeypatch.delenv("LORA_FT_DATA_DIR")
    assert data.resolve_data_file(data.INSTRUCTION_DATA) == data.INSTRUCTION_DATA.bundled
    with pytest.raises(UserError, match="data file not found"):
        data.resolve_data_file(data.SMS_SPAM, str(tmp_path / "missing.tsv"))


@pytest.mark.parametrize("known", [data.SMS_SPAM, data.INSTRUCTION_DATA], ids=["sms", "instructions"])
def test_shipped_copies_are_the_published_files(known: data.KnownDataset):
    # The same bytes as ../shared (whose README gives each file's source and sha256), with attribution beside them.
    assert known.bundled.read_bytes() == (DATA_DIR / known.relpath).read_bytes()
    assert hashlib.sha256(known.bundled.read_bytes()).hexdigest() == known.sha256
    attribution = (files.ASSETS / "README.md").read_text()
    assert known.relpath in attribution and known.sha256 in attribution
    for name in ("CC-BY-4.0.txt", "Apache-2.0.txt", "MIT-GPT-2.txt"):
        assert name in attribution and (files.ASSETS / "licenses" / name).stat().st_size > 1000


def test_a_damaged_shipped_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LORA_FT_DATA_DIR")
    damaged = tmp_path / data.SMS_SPAM.relpath
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(SMS.read_bytes()[:-10])
    monkeypatch.setattr(data, "ASSETS", tmp_path)
    with pytest.raises(UserError, match=r"SMSSpamCollection: damaged \(sha256 .*reinstall lora_ft"):
        data.resolve_data_file(data.SMS_SPAM)
    damaged.unlink()
    with pytest.raises(UserError, match="missing from this installation"):
        data.resolve_data_file(data.SMS_SPAM)


def test_shipped_gpt2_tokenizer_is_gpt2s():
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(files.GPT2_TOKENIZER)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    for name in ("vocab.json", "merges.txt"):
        assert (files.GPT2_TOKENIZER / name).read_bytes() == (GPT2_TOKENIZER / name).read_bytes()


def test_too_few_rows_for_the_split_names_the_data():
    rows = [("ham", "hi"), ("spam", "win")] * 2
    with pytest.raises(UserError, match=r"^sms\.tsv: 4 rows are too few for a 0.7/0.1/0.2 split$"):
        data.classification_splits(rows, seed=0, balance=True, source="sms.tsv")


def test_line_separators_inside_messages_are_text(tmp_path: Path):
    # U+2028, U+2029, U+0085 and form feeds are characters of a message, not line breaks: rows stay whole and line
    # numbers stay those of the file.
    odd = ["one\u2028two", "three\u2029four", "five\x85six", "seven\x0ceight"]
    path = tmp_path / "odd.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in zip(["ham", "spam"] * 2, odd, strict=True)))
    assert [text for _, text in data.read_labeled(path)] == odd
    path.write_text(path.read_text() + "spam no tab here\n")
    with pytest.raises(UserError, match="line 5 has no tab"):
        data.read_labeled(path)
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t, "label": "ab"[i % 2]}, ensure_ascii=False) + "\n" for i, t in enumerate(odd))
    )
    assert [text for _, text in data.read_labeled(jsonl)] == odd


def test_labels_that_differ_only_in_case_are_refused_naming_them(tmp_path: Path):
    path = tmp_path / "data.csv"
    rows = [("spam", "win")] * 5 + [("Spam", "win now")] * 2 + [("ham", "hi")] * 3 + [("HAM", "yo"), ("Ham", "hey")]
    path.write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in rows))
    with pytest.raises(UserError) as error:
        data.read_labeled(path)
    assert str(error.value) == (
        f"{path}: labels differ only in case: 'spam' (5 rows), 'Spam' (2 rows) (and 1 more such group); "
        "make them identical"
    )


@pytest.mark.parametrize("suffix", ["", ".tsv", ".csv", ".jsonl"])
def test_labels_that_differ_only_in_surrounding_whitespace_are_one_class(tmp_path: Path, suffix: str, caplog):
    labelled = [("spam", "win"), ("spam ", "win now"), (" ham", "hi"), ("ham\t", "hello")]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"label": label, "text": text}) + "\n" for label, text in labelled))
    elif suffix == ".csv":
        path.write_text("label,text\n" + "".join(f'"{label}",{text}\n' for label, text in labelled))
    else:  # label<TAB>text lines (a .tsv without a header is read so too); a tab inside a label cannot be written
        path.write_text("".join(f"{label.strip(chr(9))}\t{text}\n" for label, text in labelled))
    assert [label for label, _ in data.read_labeled(path)] == ["spam", "spam", "ham", "ham"]
    padded = 2 if suffix in ("", ".tsv") else 3  # a tab around a label cannot be written in label<TAB>text
    assert caplog.messages == [f"{path}: {padded} labels had spaces around them, read without ('spam ' as 'spam')"]


def test_json_labels_are_strings_or_integers(tmp_path: Path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": "0"}, {"text": "c", "label": 1}]))
    assert data.read_labeled(path) == [("0", "a"), ("0", "b"), ("1", "c")]  # 0 and "0" are one class


@pytest.mark.parametrize(
    ("labels", "refused"),
    [((0, False), "item 2: 'label' must be a string or an integer, got bool"), ((1, 1.0), "item 2: .* got float")],
)
def test_json_labels_of_other_types_are_refused(tmp_path: Path, labels: tuple, refused: str):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a", "label": label} for label in labels]))
    with pytest.raises(UserError, match=f"^{path}: {refused}$"):
        data.read_labeled(path)


@pytest.mark.parametrize(
    ("suffix", "refused"), [(".json", "not valid JSON at line 2, column 25"), (".jsonl", "line 2")]
)
def test_an_integer_longer_than_python_converts_is_bad_json(tmp_path: Path, suffix: str, refused: str):
    # json.loads raised a plain ValueError (Python's 4,300-digit limit), which the readers did not catch
    path = tmp_path / f"data{suffix}"
    records = ['{"text": "a", "label": "x"}', '{"text": "b", "label": ' + "1" * 5000 + "}"]
    path.write_text(f"[{records[0]},\n {records[1]}]" if suffix == ".json" else "\n".join(records))
    with pytest.raises(UserError, match=f"^{path}: {refused}.*an integer with too many digits"):
        data.read_labeled(path)


def test_data_that_is_a_folder_or_a_device_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match=f"^{tmp_path}: a folder, not a data file$"):
        data.resolve_data_file(data.SMS_SPAM, str(tmp_path))
    with pytest.raises(UserError, match=r"^/dev/zero: not a regular file \(a pipe or device cannot be read twice\)"):
        data.resolve_data_file(data.SMS_SPAM, "/dev/zero")


def test_a_file_of_inputs_that_never_ends_is_refused_at_the_limit(monkeypatch: pytest.MonkeyPatch):
    """/dev/zero has no size to refuse it by (it was read until the process was killed): reading stops at the limit."""
    monkeypatch.setattr(data, "MAX_INPUT_BYTES", 1 << 20)
    with pytest.raises(UserError, match=r"^/dev/zero: more than the 0.00098 GB a file of inputs may be$"):
        data.read_input("/dev/zero")


def test_a_file_of_inputs_from_a_pipe_is_read(tmp_path: Path):
    """Process substitution (`--file <(cmd)`) gives a pipe: no size, read once up to the limit."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("hello\nfree prize\n"))
    writer.start()
    assert data.read_input(str(fifo)) == (fifo, "hello\nfree prize\n")
    writer.join()
