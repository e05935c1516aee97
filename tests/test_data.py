import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from lora_ft import data
from lora_ft.errors import UserError

from .conftest import DATA_DIR

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
    known = data.KnownDataset("sub/file.txt", "http://127.0.0.1:9/never", "0" * 64)
    flag, env, cache = tmp_path / "flag.txt", tmp_path / "env", tmp_path / "cache"
    for folder in (env, cache):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "file.txt").write_text("x")
    flag.write_text("x")
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(env))
    monkeypatch.setenv("LORA_FT_CACHE_DIR", str(cache))
    assert data.resolve_data_file(known, str(flag)) == flag.resolve()
    assert data.resolve_data_file(known) == (env / "sub" / "file.txt").resolve()
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(tmp_path / "nowhere"))
    assert data.resolve_data_file(known) == cache / "sub" / "file.txt"
    with pytest.raises(UserError, match="data file not found"):
        data.resolve_data_file(known, str(tmp_path / "missing.tsv"))


@pytest.fixture
def zip_server(tmp_path: Path):
    """A loopback HTTP server serving a zip that holds SMSSpamCollection."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(SMS, "SMSSpamCollection")
    payload = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/sms.zip"
    server.shutdown()


def test_download_unzips_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip_server: str):
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("LORA_FT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    known = data.KnownDataset(data.SMS_SPAM.relpath, zip_server, data.SMS_SPAM.sha256, "SMSSpamCollection")
    path = data.resolve_data_file(known)
    assert path == tmp_path / "cache" / data.SMS_SPAM.relpath
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.SMS_SPAM.sha256

    wrong = data.KnownDataset("other/SMS", zip_server, "0" * 64, "SMSSpamCollection")
    with pytest.raises(UserError, match="does not match"):
        data.resolve_data_file(wrong)
    assert not (tmp_path / "cache" / "other" / "SMS").exists()
    assert list((tmp_path / "cache" / "other").iterdir()) == []


def test_offline_without_data_names_the_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORA_FT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_FT_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="--data PATH"):
        data.resolve_data_file(data.SMS_SPAM)


def test_too_few_rows_for_the_split_names_the_data():
    rows = [("ham", "hi"), ("spam", "win")] * 2
    with pytest.raises(UserError, match=r"^sms\.tsv: 4 rows are too few for a 0.7/0.1/0.2 split$"):
        data.classification_splits(rows, seed=0, balance=True, source="sms.tsv")
