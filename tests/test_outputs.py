"""What a command may write to: `--overwrite` replaces only a folder lora_ft made (one holding lora_ft.json), and
never the base, the data, the working folder, a parent of any of them, or a regular file. Each refusal is one line,
exit 2, and leaves every file as it was."""

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ft import cli
from lora_ft.core import files

from .conftest import DATA_DIR, REPO, tree_sha256


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


def _with_file_limit(kib: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m lora_ft ARGS` under `ulimit -f KIB` (Python ignores SIGXFSZ: a write over the limit fails with
    EFBIG, as one on a full disk fails with ENOSPC, in the OS and in safetensors' and numpy's writers alike)."""
    limit = kib * 1024
    return subprocess.run(
        [sys.executable, "-m", "lora_ft", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


def test_a_write_that_finds_no_room_is_one_line_and_keeps_what_was_there(
    spam_run, instruct_run, tiny_gpt2: Path, tmp_path: Path
) -> None:
    spam_adapter, instruct_adapter = str(spam_run[0].adapter_dir), str(instruct_run[0].adapter_dir)
    # training: the tokenizer (3.6 MB) is over the limit at the first checkpoint
    out = tmp_path / "spam"
    done = _with_file_limit(1000, "spam", "--model", str(tiny_gpt2), "--max-steps", "3", "--output", str(out))
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == f"error: {out}: File too large", done.stderr
    # merge: the merged weights (13 MB), then GGUF (15 MB) once the weights are written
    out = tmp_path / "merged"
    done = _with_file_limit(4000, "merge", spam_adapter, "--output", str(out))
    assert done.returncode == 2 and done.stderr == f"error: {out}: File too large\n"
    done = _with_file_limit(14000, "merge", instruct_adapter, "--output", str(out), "--gguf", "f32")
    assert done.returncode == 2 and done.stderr.startswith(f"error: {out}: a write was cut short (no space left")
    assert sorted(os.listdir(tmp_path)) == []  # no output, no partial or temp folder
    # an export already there is kept, byte for byte
    assert cli.main(["merge", spam_adapter, "--output", str(out), "--quiet"]) == 0
    before = _tree(out)
    done = _with_file_limit(4000, "merge", spam_adapter, "--output", str(out), "--overwrite")
    assert done.returncode == 2 and done.stderr == f"error: {out}: File too large; the one there is kept\n"
    assert _tree(out) == before and sorted(os.listdir(tmp_path)) == ["merged"]


def test_no_room_is_told_from_other_errors() -> None:
    assert files.no_room(OSError(errno.ENOSPC, "No space left on device", "x")) == "No space left on device"
    assert files.no_room(Exception("Error while serializing: I/O error: File too large (os error 27)")) == (
        "File too large"
    )
    assert files.no_room(OSError("3216448 requested and 1884416 written")).startswith("a write was cut short")
    assert files.no_room(OSError(errno.EACCES, "Permission denied", "x")) is None
    assert files.no_room(ValueError("bad (os error 2)")) is None
