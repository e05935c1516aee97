"""`serve` against hostile clients, as a real server process: stalled connections (no request, half a request line,
a head or body sent slowly, an idle keep-alive) are closed at their deadlines while /health answers others; a Host
header check without --api-key (DNS rebinding); a key no header can carry refused at startup; JSON errors for
malformed HTTP; chat requests checked as `generate --file` and training check conversations; /health answering
while large bodies are tokenized; and random request bodies that never get a 5xx.

Two adapters on the tiny GPT-2, trained for two steps here: one on conversations (its chat template), one on
instructions (the Alpaca prompt)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ft.core.config import load_config
from lora_ft.core.errors import UserError
from lora_ft.data import chat
from lora_ft.tasks import instruct

from .conftest import EXACT, run_cli, write_examples
from .test_serve import Server

HEADER_S, BODY_S, KEEP_ALIVE_S = 1.0, 2.0, 5.0
SLACK_S = 1.5  # a loaded 2-core machine
CONVERSATIONS = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "stop"},
        {"role": "assistant", "content": "pots"},
    ],
]


@pytest.fixture(scope="module")
def adapters(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 10))
    common = {"model": str(tiny_gpt2), "max_steps": 2, "batch_size": 4, "test_limit": 2, "max_new_tokens": 4}
    common |= {"max_length": 128, **EXACT}
    runs = {"chat-tiny": folder / "chats.jsonl", "instr-tiny": write_examples(folder / "four.json")}
    for name, data in runs.items():
        instruct.train(load_config("instruct", overrides=common | {"data": str(data), "output": str(folder / name)}))
    return {name: folder / name for name in runs}


@pytest.fixture(scope="module")
def server(adapters):
    flags = ["--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S), "--max-tokens", "8"]
    started = Server(*map(str, adapters.values()), *flags, "--allowed-host", "box.test")
    yield started
    started.stop()
    assert "Traceback" not in started.output, started.output


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _raw(url: str, sent: bytes, wait: float = 10.0) -> tuple[bytes, float | None]:
    """What the server answers `sent` on a fresh connection, and how long after sending it closed the connection
    (None: still open after `wait` seconds)."""
    with socket.create_connection(_address(url)) as sock:
        sock.settimeout(wait)
        started, answer = time.monotonic(), b""
        sock.sendall(sent)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, None
        return answer, time.monotonic() - started


def _json_error(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)["error"]


class _HealthWatch:
    """/health asked again and again from another client while something else goes on: every answer's latency."""

    def __init__(self, url: str):
        self.url, self.latencies, self.statuses, self.stop = url, [], [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                started = time.monotonic()
                self.statuses.append(c.get("/health").status_code)
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    def __enter__(self) -> _HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


# --- 1. stalled connections ---------------------------------------------------------------------------------------

STALLS = [
    (b"", HEADER_S, None),  # a connection opened, nothing sent: closed silently
    (b"GET /hea", HEADER_S, "head"),  # half a request line
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", HEADER_S, "head"),  # headers begun, never ended
    (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
        b'\r\n{"model": "instr-tiny", ',
        BODY_S,
        "body",
    ),
]


@pytest.mark.parametrize(("sent", "limit", "part"), STALLS)
def test_a_stalled_connection_is_closed_at_its_deadline_while_health_answers(server, sent, limit, part):
    with _HealthWatch(server.url) as watch:
        answer, closed_after = _raw(server.url, sent)
    assert closed_after is not None, "the server never closed the stalled connection"
    assert limit - 0.2 <= closed_after <= limit + SLACK_S
    if part is None:
        assert answer == b""
    else:
        assert f"request's {part} did not arrive" in _json_error(answer, 408)["message"]
    assert watch.statuses and set(watch.statuses) == {200} and max(watch.latencies) < 1.0


def test_a_head_trickled_byte_by_byte_is_still_cut_at_its_deadline(server):
    """Each byte arrives well within any idle timeout: the deadline is on the whole head, not between bytes."""
    with socket.create_connection(_address(server.url)) as sock:
        started = time.monotonic()
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
            pytest.fail("the server kept reading a head sent for 15 s")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.monotonic() - started <= HEADER_S + SLACK_S + 0.2


def test_an_idle_keep_alive_connection_is_closed(server):
    answer, closed_after = _raw(server.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert closed_after is not None and closed_after <= min(HEADER_S, KEEP_ALIVE_S) + SLACK_S


def test_many_stalled_connections_leave_the_server_serving(server, client):
    sockets = [socket.create_connection(_address(server.url)) for _ in range(50)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /v1/mod")
        assert client.get("/health").status_code == 200
        time.sleep(HEADER_S + SLACK_S)
        for sock in sockets:
            sock.settimeout(5)
            assert _json_error(sock.recv(65536), 408)
            assert sock.recv(65536) == b""  # closed
    finally:
        for sock in sockets:
            sock.close()
    assert client.get("/health").status_code == 200


def test_timeouts_out_of_range_are_refused_at_startup(adapters):
    for flag, value in (("--header-timeout", "0"), ("--body-timeout", "nan"), ("--header-timeout", "inf")):
        result = run_cli("serve", str(adapters["instr-tiny"]), flag, value, "--port", "0", timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {flag} must be"), result.stderr


# --- 2. the Host header, without an API key (DNS rebinding) -------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_foreign_host_is_refused_without_a_key(client, host):
    for path in ("/v1/models", "/health", "/"):
        answer = client.get(path, headers={"Host": host})
        assert answer.status_code == 421, answer.text
        error = answer.json()["error"]
        assert error["code"] == "host_not_allowed" and f"Host {host!r} is not allowed" in error["message"]
        assert "--allowed-host" in error["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "10.0.0.7", "box.test"])
def test_localhost_addresses_and_allowed_names_are_answered(client, host):
    assert client.get("/v1/models", headers={"Host": host}).status_code == 200


def test_with_a_key_the_host_is_not_checked(adapters):
    key = "hostile-key-1"
    keyed = Server(str(adapters["instr-tiny"]), "--api-key", key)
    try:
        answer = httpx.get(keyed.url + "/v1/models", headers={"Host": "evil.example", "Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        assert httpx.get(keyed.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 401
    finally:
        keyed.stop()


# --- 3. a key that no header can carry ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["clé-secrète", "tok\x01en", " tok3n", "tok3n ", ""])
def test_a_key_that_could_never_match_is_refused_at_startup(adapters, key):
    result = run_cli("serve", str(adapters["instr-tiny"]), "--api-key", key, "--port", "0", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --api-key must be printable ASCII")
    assert "printable ASCII" in result.stderr and (not key.strip() or key.strip() not in result.stderr)


def test_a_key_from_the_environment_is_checked_too(adapters):
    import os

    env = os.environ | {"LORA_FT_API_KEY": "schlüssel"}
    result = run_cli("serve", str(adapters["instr-tiny"]), "--port", "0", timeout=60, env=env)
    assert result.returncode == 2 and "$LORA_FT_API_KEY" in result.stderr and "schlüssel" not in result.stderr


# --- 4. every error is JSON ---------------------------------------------------------------------------------------

MALFORMED = [
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer a\x00b\r\n\r\n",  # a NUL in a header
    b"GARBAGE\r\n\r\n",  # no request line
    b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a byte no URL holds
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Host headers
    b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 with no Host
]


@pytest.mark.parametrize("sent", MALFORMED)
def test_malformed_http_gets_a_json_400(server, client, sent):
    answer, closed_after = _raw(server.url, sent)
    assert "malformed HTTP request" in _json_error(answer, 400)["message"]
    assert closed_after is not None
    assert client.get("/health").status_code == 200


def test_a_non_ascii_authorization_reaching_the_app_is_a_json_error(adapters):
    """A header h11 accepts (bytes 0x80-0xFF are allowed there) reaches the key check: a JSON 401."""
    key = "hostile-key-2"
    keyed = Server(str(adapters["instr-tiny"]), "--api-key", key)
    try:
        sent = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xe9\xff\r\n\r\n"
        assert _json_error(_raw(keyed.url, sent)[0], 401)["type"] == "authentication_error"
    finally:
        keyed.stop()
    assert "Traceback" not in keyed.output


# --- 5. serve accepts the conversations `generate --file` and training accept -------------------------------------

U, A, S = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "yo"), ("system", "be brief")))
REFUSED = [
    ([U, {"role": "assistant", "content": ""}, U], "message 2: 'content' is empty"),
    ([U, {"role": "assistant", "content": " \n"}, U], "message 2: 'content' is empty"),
    ([U, {"role": "assistant"}, U], "message 2"),
    ([U, S, U], "message 2: a system message can only come first"),
    ([A, U], "the conversation must start with a user message"),
    ([S, A, U], "the conversation must start with a user message"),
    ([U, A], "a request ends with the user's turn"),
]


@pytest.mark.parametrize(("messages", "said"), REFUSED)
def test_serve_refuses_what_generate_refuses(client, tmp_path: Path, messages, said):
    written = tmp_path / "requests.jsonl"
    text = json.dumps({"messages": [m if "content" in m else m | {"content": ""} for m in messages]}) + "\n"
    written.write_text(text)
    with pytest.raises(UserError, match=said.replace("'", ".")):  # `generate --file`'s reader
        chat.read_requests(written, text)
    for model in ("chat-tiny", "instr-tiny"):
        answer = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2})
        assert answer.status_code == 400, (model, answer.text)
        assert said in answer.json()["error"]["message"]


def test_a_tool_message_is_refused_as_training_refuses_it(client):
    messages = [U, {"role": "tool", "content": "42"}, U]
    answer = client.post("/v1/chat/completions", json={"model": "instr-tiny", "messages": messages})
    assert answer.status_code == 400 and "role" in answer.json()["error"]["message"]


def test_what_generate_accepts_serve_answers(client):
    messages = [{"role": "developer", "content": "be brief"}, U, A, {"role": "user", "content": "again"}]
    for model in ("chat-tiny", "instr-tiny"):
        answer = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2})
        assert answer.status_code == 200, answer.text


# --- 6. tokenizing off the event loop, sizes capped before the work -----------------------------------------------


def test_health_answers_while_four_large_bodies_are_tokenized(server, client):
    """Four 1.3 MB bodies (11 messages of 20,000 characters each, escaped in JSON): each is rendered and tokenized
    in a worker thread (and refused: over the context), while /health keeps answering."""
    text = "é€" * 10_000
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(11)]
    body = json.dumps({"model": "chat-tiny", "messages": messages, "max_tokens": 2}).encode()
    assert 1_000_000 < len(body) < 1_400_000
    statuses: list[int] = []

    def send() -> None:
        headers = {"content-type": "application/json"}
        statuses.append(
            httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=60).status_code
        )

    with _HealthWatch(server.url) as watch:
        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert statuses == [400] * 4
    assert len(watch.latencies) >= 3 and max(watch.latencies) < 1.0, watch.latencies


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    answer, _ = _raw(server.url, head + b"Content-Length: 999999999\r\n\r\n{")
    assert "over this server's" in _json_error(answer, 413)["message"]


# --- 7. random bodies: 2xx or a JSON 4xx, never a 5xx ------------------------------------------------------------

FIELDS = ["model", "prompt", "messages", "input", "raw", "max_tokens", "max_completion_tokens", "temperature"]
FIELDS += ["top_p", "seed", "stream", "n", "role", "content"]
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
SCALARS |= st.sampled_from(["chat-tiny", "instr-tiny", "user", "system", "assistant", "\ud800", "", " "])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries({}, optional={"role": JSON, "content": JSON}) | JSON
BODY = (
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["chat-tiny", "instr-tiny"]) | JSON,
            "prompt": JSON,
            "messages": st.lists(MESSAGE, max_size=4) | JSON,
            **{name: JSON for name in FIELDS[3:]},
        },
    )
    | JSON
)


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(body=BODY, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bodies_get_2xx_or_a_json_4xx(client, body, path):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # the server's cap: keep the generations short
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity as Python writes them, which JSON lacks
    answer = client.post(path, content=content, headers={"content-type": "application/json"})
    assert answer.status_code < 500, (body, answer.text)
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert error["message"] and error["type"]
    elif answer.headers["content-type"].startswith("application/json"):
        assert answer.json()["choices"]
    else:
        assert answer.text.endswith("data: [DONE]\n\n")
