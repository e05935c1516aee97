"""What a command may write to: `--overwrite` replaces only a folder lora_ft made (one holding lora_ft.json), and
never the base, the data, the working folder, a parent of any of them, or a regular file. Each refusal is one line,
exit 2, and leaves every file as it was."""

import os
import shutil
from pathlib import Path

import pytest

from lora_ft import cli

from .conftest import DATA_DIR, tree_sha256


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), hidden ones included."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def workspace(tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny base (models/base) and of the SMS data (data/sms.tsv), a file of the user's, and the
    working folder (work/) the commands run from."""
    shutil.copytree(tiny_gpt2, tmp_path / "models" / "base")
    (tmp_path / "data").mkdir()
    shutil.copy(DATA_DIR / "sms_spam_collection" / "SMSSpamCollection", tmp_path / "data" / "sms.tsv")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


CASES = {
    # --output, and what the one-line error names
    "the base folder": ("../models/base", "overlaps the base model"),
    "inside the base folder": ("../models/base/adapter", "overlaps the base model"),
    "a parent of the base": ("../models", "overlaps the base model"),
    "a parent of the working folder": ("..", "the working folder or holds it"),
    "the data file": ("../data/sms.tsv", "is a file, not a folder"),
    "the data's folder": ("../data", "overlaps the data"),
    "the working folder": (".", "the working folder or holds it"),
    "a regular file": ("../notes.txt", "is a file, not a folder"),
    "under a regular file": ("../notes.txt/adapter", "is a file, not a folder"),
    "a folder lora_ft did not make": ("../other", "not a folder lora_ft made"),
}


@pytest.mark.parametrize("case", CASES)
def test_overwrite_never_replaces_what_lora_ft_did_not_make(workspace: Path, case: str, capsys) -> None:
    output, named = CASES[case]
    (workspace / "other").mkdir()
    (workspace / "other" / "thesis.tex").write_text("years of work\n")
    before = _tree(workspace)
    argv = ["spam", "--model", "../models/base", "--data", "../data/sms.tsv", "--max-steps", "1", "--output", output]
    assert cli.main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and named in err and err.count("\n") == 1, err
    assert _tree(workspace) == before


def test_merge_follows_the_same_rule(spam_run, tmp_path: Path, capsys) -> None:
    result, _ = spam_run
    (tmp_path / "file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("x")
    before = _tree(tmp_path)
    for output, named in ((tmp_path / "file", "is a file"), (tmp_path / "theirs", "not a folder lora_ft made")):
        assert cli.main(["merge", str(result.adapter_dir), "--output", str(output), "--overwrite"]) == 2
        assert named in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_an_adapter_lora_ft_made(spam_run, tiny_gpt2: Path, tmp_path: Path) -> None:
    existing = tmp_path / "adapter"
    shutil.copytree(spam_run[0].adapter_dir, existing)
    before = tree_sha256(existing)
    argv = ["spam", "--model", str(tiny_gpt2), "--max-steps", "2", "--output", str(existing), "--overwrite", "--quiet"]
    assert cli.main(argv) == 0
    assert tree_sha256(existing) != before and (existing / "lora_ft.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
