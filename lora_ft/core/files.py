"""Bottom layer: atomic writes, hashing, lora_ft's cache folder, the files shipped with the package, and whether the
Hugging Face Hub can be reached. Imports nothing of lora_ft's but its errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError

CACHE_DIR_ENV = "LORA_FT_CACHE_DIR"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
GPT2_TOKENIZER = ASSETS / "gpt2_tokenizer"  # vocab.json + merges.txt (MIT), for tokenizer-only paths offline
MANIFEST_NAME = "lora_ft.json"  # a folder holding one is lora_ft's: the only kind `overwrite` replaces


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def hash_into(digest: Any, path: Path) -> None:
    """`path`'s bytes fed to `digest` (a hashlib hash), a block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def checked(path: Path, sha256: str) -> Path:
    """`path`, after checking it hashes to `sha256`: a shipped or fetched file that was damaged is named, not used."""
    actual = sha256_file(path)
    if actual != sha256:
        raise UserError(f"{path}: damaged (sha256 {actual[:12]}..., expected {sha256[:12]}...); reinstall lora_ft")
    return path


GB = 1 << 30
MAX_INPUT_BYTES = 1 * GB  # a data or request file is read whole: larger ones are refused before reading
MAX_RECORD_BYTES = 64 << 20  # a manifest, run record or recipe


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, refused when over `limit` before they are read whole (a 12 GB file would end in
    MemoryError). A regular file is refused by its size; anything else (a pipe such as `<(cmd)`, a FIFO, a device
    such as /dev/urandom that never ends) by reading no more than the limit."""
    with open(path, "rb") as f:
        found = os.fstat(f.fileno())
        if stat.S_ISREG(found.st_mode) and found.st_size > limit:
            raise UserError(f"{path}: {found.st_size / GB:.1f} GB, more than the {limit / GB:.2g} GB a {what} may be")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: more than the {limit / GB:.2g} GB a {what} may be")
    return data


def lines(text: str) -> list[str]:
    """`text` split into lines at \\n (and \\r\\n) only. str.splitlines also splits at characters a message may hold
    (U+2028, U+2029, U+0085, form feeds), which would break records and shift every line number after them."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_json(text: str) -> Any:
    """json.loads, raising only JSONDecodeError on bad input so that callers catch one error: also for nesting too
    deep for Python's parser (a RecursionError) and for an integer over Python's 4,300 digits (a plain ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text[:1], 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits() (4,300 by default)
        digits = re.search(r"\d{4301,}", text)
        raise json.JSONDecodeError("an integer with too many digits", text, digits.start() if digits else 0) from None


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_ft"


def write_text_atomically(path: Path, text: str) -> None:
    """`text` at `path`, written beside it first and renamed into place."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, written beside it first and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:  # a write cut short (a full disk) leaves no temp file behind
        tmp.unlink(missing_ok=True)


def write_bytes_new(path: Path, data: bytes) -> None:
    """`data` at `path`, which must not exist: written beside it first and hard-linked into place, so that it never
    replaces a file (FileExistsError, also for one that appears meanwhile) and is never seen half-written. Where the
    filesystem has no hard links, checked and then renamed."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(errno.EEXIST, "File exists", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:  # the temp file goes whatever happens: linked into place, or a write cut short (a full disk)
        tmp.write_bytes(data)
        _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    """`tmp` hard-linked as `path`, never over a file there; renamed where the filesystem has no hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network filesystems)
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as JSON at `path`, written beside it first and renamed into place."""
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB, macOS bytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing, unreadable or not an object (for caches)."""
    try:
        value = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: no downloads from the Hub. Read on every call, unlike
    huggingface_hub's constant, so that a caller may set it after import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "on", "yes", "true")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the Hub, instead of the client's minute of retries when there is no network."""
    url = urllib.parse.urlsplit(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


def hub_cached(repo_id: str, filenames: tuple[str, ...] = ("config.json",)) -> bool:
    """Whether the Hub cache holds these files of `repo_id` (no network). The cache folder is read from the
    environment on every call ($HF_HUB_CACHE, else $HF_HOME/hub), like `offline`."""
    from huggingface_hub import constants, try_to_load_from_cache

    folder = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE
    )
    return all(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=folder), str) for name in filenames)


def check_output_free(output: Path, overwrite: bool = False, keep: dict[str, Path] | None = None) -> None:
    """`output` may be written: it is missing or an empty folder, or, with `overwrite`, a folder lora_ft made (one
    holding its manifest). Never a regular file or a path under one, never the working folder or a folder holding
    it, and never one of `keep` (what the command reads: the base, the data, the adapter), a path inside one or a
    folder holding one. Each refusal names the flags (`output`, `overwrite`)."""
    target = output.resolve()
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            raise UserError(f"`output` {output}: {path} is a file, not a folder; choose a folder of its own")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise UserError(f"`output` {output}: is the working folder or holds it; choose a folder of its own")
    for what, path in (keep or {}).items():
        path = path.resolve()
        if target == path or target in path.parents or path in target.parents:
            raise UserError(f"`output` {output}: overlaps {what} ({path}); choose a folder of its own")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError(f"{output}: already exists; choose another `output` or pass `overwrite`")
        if not (output / MANIFEST_NAME).is_file():
            raise UserError(
                f"`output` {output}: not a folder lora_ft made (no {MANIFEST_NAME}); `overwrite` replaces only those"
            )


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk or quota, a file over `ulimit -f`


def no_room(error: BaseException) -> str | None:
    """Why `error` is a write that found no room (the OS's words), or None when it is something else. safetensors'
    writer, in Rust, raises a SafetensorError that names the OS error only in its text (`... (os error 27)`), and
    numpy's `tofile` (the GGUF writer's) an OSError with no errno at all for a write cut short."""
    short = re.fullmatch(r"\d+ requested and \d+ written", str(error))
    if isinstance(error, OSError) and error.errno is None and short:
        return "a write was cut short (no space left on the device, or a file over the size limit)"
    if isinstance(error, OSError):
        return error.strerror if error.errno in NO_ROOM else None
    found = re.search(r"\(os error (\d+)\)", str(error))
    return os.strerror(int(found[1])) if found and int(found[1]) in NO_ROOM else None


def without_room(output: Path, error: BaseException) -> BaseException:
    """`error` as one line naming `output` if it is a write that found no room (`no_room`), else `error` itself."""
    reason = no_room(error)
    if reason is None:
        return error
    return UserError(f"{output}: {reason}" + ("; the one there is kept" if output.exists() else ""))


@contextlib.contextmanager
def staged(output: Path, overwrite: bool = False, keep: dict[str, Path] | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `output` (checked by `check_output_free`); on success it replaces `output` in one
    rename, on any error it is removed and `output` (if it existed) is left as it was. A write that finds no room
    is one line naming `output`."""
    check_output_free(output, overwrite, keep)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{int(time.time())}"
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(output, tmp)
    except Exception as e:
        error = without_room(output, e)
        if error is e:
            raise
        raise error from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(output: Path, tmp: Path) -> None:
    """`tmp` renamed to `output`; an `output` already there is swapped out in the same step, then removed."""
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
