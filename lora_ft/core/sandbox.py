"""Chat templates rendered in a sandbox. A template is code that came with a folder (an adapter's, a base's): it is
rendered by transformers' own renderer (jinja2's ImmutableSandboxedEnvironment, so it cannot reach Python's
internals) in a child process of lora_ft's, so that it is also bounded in time (the child is killed), memory
(RLIMIT_AS) and output size, and a template that loops, recurses or builds a huge string stops only its own request:
the caller's threads, event loop and signal handlers go on. One child serves many renders (its start, about a second,
is paid once); a few run side by side for concurrent callers. Why not in-process: neither a Python thread nor jinja2
can be stopped in the middle of a render, and a single `'x' * 10**10` allocates before any check could run."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

from .errors import UserError

TIMEOUT_S = 10.0  # one call (one conversation and its prefixes); rendering takes milliseconds
MAX_CHARS = 8_000_000  # characters a call may return in all
MEMORY_BYTES = 1 << 30  # address space a render may add to the child's
START_TIMEOUT_S = 120.0  # a renderer's start: importing transformers' renderer
CHILDREN = 4  # renders at once (serve's concurrent requests); more wait for a free child
_SIZE = 8  # bytes of a message's length prefix


class TemplateRefused(UserError):
    """The template itself refused the conversation (`raise_exception`, a TemplateError): the caller names where."""


class _Child:
    """One renderer process, spoken to over its stdin/stdout: a length-prefixed JSON request, a JSON answer."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_ft.core.sandbox", str(MEMORY_BYTES), str(MAX_CHARS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=os.environ | {"TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"},
        )
        self.started = False

    def start(self) -> None:
        """Wait for the child's first byte, sent once it has imported the renderer: a start (a second or two, more on
        a busy machine) does not count against a render's time."""
        if not self.started:
            self._read(1, time.monotonic() + START_TIMEOUT_S)
            self.started = True

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        body = json.dumps(request).encode("utf-8", "surrogatepass")
        self.process.stdin.write(len(body).to_bytes(_SIZE, "big") + body)
        self.process.stdin.flush()
        self.start()
        deadline = time.monotonic() + timeout
        size = int.from_bytes(self._read(_SIZE, deadline), "big")
        return json.loads(self._read(size, deadline).decode("utf-8", "surrogatepass"))

    def _read(self, count: int, deadline: float) -> bytes:
        out, fd = bytearray(), self.process.stdout.fileno()
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            piece = os.read(fd, min(count - len(out), 1 << 20))
            if not piece:
                raise EOFError
            out += piece
        return bytes(out)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()


_idle: list[_Child] = []
_running: set[_Child] = set()  # every child alive, idle or rendering
_lock = threading.Lock()
_slots = threading.BoundedSemaphore(CHILDREN)


def render(template: str, conversations: list[tuple[list[dict[str, str]], bool]], tokens: dict[str, Any]) -> list[str]:
    """Each (messages, add_generation_prompt) of `conversations` rendered with `template`, the special tokens
    `tokens` (`tokenizer.special_tokens_map`) in scope as transformers puts them. A template that refuses a
    conversation raises TemplateRefused; one that runs over TIMEOUT_S, MEMORY_BYTES or MAX_CHARS, or fails otherwise,
    a UserError saying so."""
    request = {"template": template, "conversations": conversations, "tokens": tokens}
    with _slots:
        with _lock:
            child = _idle.pop() if _idle else _Child()
            _running.add(child)
        try:
            answer = child.ask(request, TIMEOUT_S)
        except TimeoutError:
            _end(child)
            raise UserError(f"the chat template took over {TIMEOUT_S:g} s to render (a loop?): stopped") from None
        except (EOFError, OSError, ValueError):
            _end(child)
            raise UserError("the chat template's renderer ended (out of memory, or the server is stopping)") from None
        with _lock:
            _idle.append(child)
    if "refused" in answer:
        raise TemplateRefused(answer["refused"])
    if "error" in answer:
        raise UserError(f"the chat template cannot be rendered: {answer['error']}")
    return answer["texts"]


def _end(child: _Child) -> None:
    child.kill()
    with _lock:
        _running.discard(child)


def stop() -> None:
    """End every renderer, busy ones too (their callers get a UserError at once): a server shutting down does not wait
    out a render's time bound. A later render starts a new one."""
    with _lock:
        children = list(_running)
        _idle.clear()
    for child in children:
        _end(child)


# --- the child ----------------------------------------------------------------------------------------------


def _answer(request: dict[str, Any], max_chars: int) -> dict[str, Any]:
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, total = [], 0
    try:
        for messages, add_generation_prompt in request["conversations"]:
            (text,), _ = render_jinja_template(
                [messages],
                chat_template=request["template"],
                add_generation_prompt=add_generation_prompt,
                **request["tokens"],
            )
            total += len(text)
            if total > max_chars:
                return {"error": f"it renders over {max_chars:,} characters"}
            texts.append(text)
    except TemplateError as e:
        return {"refused": " ".join(str(e).split())[:300]}
    except MemoryError:
        return {"error": "it needs more memory than a render may have"}
    except RecursionError:
        return {"error": "it recurses too deeply"}
    except Exception as e:  # the template's own code failed: its message, on one line
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return {"texts": texts}


def _child_main(memory_bytes: int, max_chars: int) -> None:
    import resource

    from transformers.utils import chat_template_utils  # noqa: F401  (imported before the limit: its own memory)

    used = _address_space()
    resource.setrlimit(resource.RLIMIT_AS, (used + memory_bytes, used + memory_bytes))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"R")  # ready
    stdout.flush()
    while True:
        head = stdin.read(_SIZE)
        if len(head) < _SIZE:
            return
        request = json.loads(stdin.read(int.from_bytes(head, "big")).decode("utf-8", "surrogatepass"))
        body = json.dumps(_answer(request, max_chars)).encode("utf-8", "surrogatepass")
        stdout.write(len(body).to_bytes(_SIZE, "big") + body)
        stdout.flush()


def _address_space() -> int:
    """This process's virtual memory now, in bytes (Linux's /proc; elsewhere a generous guess)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 4 << 30


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
