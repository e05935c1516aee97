"""`serve` as a real server process on 127.0.0.1: the official openai client, /v1/classify against `predict` and
/v1/completions against `generate` on the same adapters, one base shared by two adapters, a table of bad requests,
cancellation, a bounded load test, the API key and the full queue (503), and the page in headless Chromium.

Two adapters per task on the tiny GPT-2: the session's trained ones (spam_run, instruct_run) and two trained for two
steps here, so that each base is shared by two adapters that answer differently."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from lora_ft.core.config import load_config
from lora_ft.tasks import classify, instruct

from .conftest import DATA_DIR, EXACT, PAIRS, REPO, run_cli, write_examples

MESSAGES = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now",
    "see you at 5",
    "Ok lar... Joking wif u oni...",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
]
KEY = "test-key-123"


class Server:
    """`python -m lora_ft serve ARGS --port 0` (or another COMMAND that says READY once it listens) in its own
    process; its output is drained into `self.lines`."""

    COMMAND, READY = "serve", r"serving \d+ adapters at (http://\S+)/ "

    def __init__(self, *args: str, timeout: float = 120):
        command = [sys.executable, "-m", "lora_ft", self.COMMAND, *args, "--port", "0"]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8"
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.started = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.started.wait(timeout) or self.url is None:
            self.stop()
            pytest.fail(f"{self.COMMAND} did not start:\n" + self.output)

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            found = re.search(self.READY, line)
            if found:
                self.url = found[1]
                self.started.set()
        self.started.set()  # ended without serving

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _train_short(tiny_gpt2: Path, folder: Path) -> tuple[Path, Path]:
    """A classifier and an instruction adapter trained for two steps: each answers unlike the session's."""
    rows = (DATA_DIR / "sms_spam_collection" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:80]
    (folder / "sms.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spam = {"model": str(tiny_gpt2), "data": str(folder / "sms.tsv"), "output": str(folder / "spam-b"), "max_steps": 2}
    spam |= EXACT
    classify.train(load_config("spam", overrides=spam))
    chat = {
        "model": str(tiny_gpt2),
        "data": str(write_examples(folder / "four.json")),
        "output": str(folder / "chat-b"),
        "max_steps": 2,
        "max_length": 256,
        "max_new_tokens": 16,
        **EXACT,
    }
    instruct.train(load_config("instruct", overrides=chat))
    return folder / "spam-b", folder / "chat-b"


@pytest.fixture(scope="module")
def served(spam_run, instruct_run, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """The four adapters (two bases: a classifier and a causal LM, each shared by two), served."""
    folder = tmp_path_factory.mktemp("serve")
    shutil.copytree(spam_run[0].adapter_dir, folder / "spam-tiny")
    shutil.copytree(instruct_run[0].adapter_dir, folder / "instruct-tiny")
    _train_short(tiny_gpt2, folder)
    paths = {name: folder / name for name in ("spam-tiny", "spam-b", "instruct-tiny", "chat-b")}
    server = Server(*map(str, paths.values()))
    yield server, paths
    server.stop()
    assert "Traceback" not in server.output, server.output


@pytest.fixture(scope="module")
def client(served) -> httpx.Client:
    with httpx.Client(base_url=served[0].url, timeout=60) as c:
        yield c


def test_startup_reports_one_base_per_pair_and_each_adapter(served, client):
    server, _ = served
    assert "shared by 2 adapters" in server.output
    memory = client.get("/health").json()["memory"]
    assert len(memory["bases"]) == 2
    for base in memory["bases"]:
        assert len(base["adapters"]) == 2
        assert all(0 < size < base["weight_bytes"] / 20 for size in base["adapters"].values())
    assert memory["weight_bytes"] == sum(b["weight_bytes"] + sum(b["adapters"].values()) for b in memory["bases"])


def test_openai_client_lists_completes_and_streams(served):
    openai = pytest.importorskip("openai")
    server, paths = served
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == set(paths)
    assert models["spam-tiny"].model_extra["task"] == "spam"
    assert models["spam-tiny"].model_extra["metric"]["name"] == "accuracy"
    assert models["instruct-tiny"].model_extra["base"] == "gpt2"

    instruction, given, output = PAIRS[1]
    done = api.completions.create(
        model="instruct-tiny", prompt=instruction, max_tokens=24, temperature=0, extra_body={"input": given}
    )
    assert done.choices[0].text == output and done.choices[0].finish_reason == "stop"

    stream = api.chat.completions.create(
        model="instruct-tiny", messages=[{"role": "user", "content": PAIRS[0][0]}], max_tokens=24, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == PAIRS[0][2]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_classify_equals_predict(served, client):
    _, paths = served
    for name in ("spam-tiny", "spam-b"):
        expected = classify.predict(paths[name], MESSAGES)
        answer = client.post("/v1/classify", json={"model": name, "input": MESSAGES})
        assert answer.status_code == 200, answer.text
        got = answer.json()["data"]
        assert [g["label"] for g in got] == [p.label for p in expected]
        assert [g["score"] for g in got] == pytest.approx([p.score for p in expected], abs=1e-5)
    one = client.post("/v1/classify", json={"model": "spam-b", "input": MESSAGES[0]}).json()["data"]
    assert len(one) == 1 and one[0]["label"] == got[0]["label"]


def test_completions_equal_generate(served, client):
    _, paths = served
    requests = [{"instruction": i, "input": x} for i, x, _ in PAIRS]
    for name in ("instruct-tiny", "chat-b"):
        expected = instruct.respond(paths[name], requests, max_new_tokens=20)
        for request, generation in zip(requests, expected, strict=True):
            body = {"model": name, "prompt": request["instruction"], "input": request["input"], "max_tokens": 20}
            choice = client.post("/v1/completions", json=body).json()["choices"][0]
            assert choice["text"] == generation.response
            assert choice["finish_reason"] == ("stop" if generation.stopped_at_eos else "length")
    assert [g.response for g in expected] != [output for _, _, output in PAIRS]  # chat-b is not instruct-tiny


def test_a_seeded_sample_equals_generates_and_repeats(served, client):
    _, paths = served
    sampling = {"temperature": 1.5, "top_p": 0.95, "seed": 7}
    (expected,) = instruct.respond(paths["chat-b"], [{"instruction": PAIRS[2][0]}], max_new_tokens=16, **sampling)
    body = {"model": "chat-b", "prompt": PAIRS[2][0], "max_tokens": 16, **sampling}
    texts = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts == [expected.response] * 2
    other = client.post("/v1/completions", json=body | {"seed": 8}).json()["choices"][0]["text"]
    assert other != expected.response


LONG_PROMPT = " ".join(["word"] * 400)  # under the character limit, over the tiny model's 256 positions
# (method, path, body: a JSON value or raw bytes, status, words of the message)
LONE_SURROGATE = {"role": "user", "content": "\ud83d"}  # half of an emoji: no UTF-8 holds it
BAD_REQUESTS = [
    ("POST", "/v1/classify", {"model": "nope", "input": "hi"}, 404, "not served"),
    ("POST", "/v1/classify", {"model": "/tmp/spam-tiny", "input": "hi"}, 404, "not served"),
    ("POST", "/v1/classify", {"model": "instruct-tiny", "input": "hi"}, 400, "does not classify"),
    ("POST", "/v1/completions", {"model": "spam-tiny", "prompt": "hi"}, 400, "does not generate"),
    ("POST", "/v1/classify", b'{"model": "spam-tiny", "input": ', 400, "malformed JSON"),
    ("POST", "/v1/classify", [], 400, "valid dictionary"),
    ("POST", "/v1/classify", {"input": "hi"}, 400, "model: Field required"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": 5}, 400, "valid string"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": ["a", 7]}, 400, "valid string"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": " "}, 400, "empty"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": []}, 400, "1 to 16 texts"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": ["a"] * 17}, 400, "1 to 16 texts"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": "x" * 20_001}, 400, "20001 characters"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": LONG_PROMPT}, 400, "reads at most 256"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "max_tokens": 513}, 400, "cap of 512"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "max_tokens": "5"}, 400, "valid integer"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "n": 2}, 400, "n:"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
    ("POST", "/v1/chat/completions", {"model": "chat-b", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "chat-b", "messages": [{"role": "user"}]}, 400, "prompt is empty"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "chat-b", "messages": [{"role": "system", "content": "be brief"}]},
        400,
        "no user message",
    ),
    ("POST", "/v1/chat/completions", {"model": "chat-b", "messages": [{"role": "x", "content": "a"}]}, 400, "role"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "seed": -1}, 400, "seed:"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "hi", "seed": 2**32}, 400, "seed:"),
    ("POST", "/v1/completions", {"model": "chat-b", "prompt": "a\ud800b"}, 400, "lone surrogate"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": ["ok", "\udfff"]}, 400, "lone surrogate"),
    ("POST", "/v1/chat/completions", {"model": "chat-b", "messages": [LONE_SURROGATE]}, 400, "lone surrogate"),
    ("POST", "/v1/classify", b"model=spam-tiny", 400, "Content-Type: application/json"),
    ("POST", "/v1/classify", {"model": "spam-tiny", "input": "x" * 1_500_000}, 413, "over this server"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
    ("GET", "/v1/classify", None, 405, "Method Not Allowed"),
]


def _send_json(client: httpx.Client, method: str, path: str, body: object) -> httpx.Response:
    """The body as JSON with non-ASCII escaped (`\\ud800` for a lone surrogate), as Python's json writes it: httpx2's
    own `json=` writes UTF-8, which no lone surrogate has, so it fails in the client before anything is sent."""
    content = json.dumps(body) if body is not None else None
    return client.request(method, path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), BAD_REQUESTS)
def test_bad_request_gets_its_json_error_and_the_server_goes_on(client, method, path, body, status, words):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json" if body.startswith(b"{") else "text/plain"}
        answer = client.request(method, path, content=body, headers=headers)
    else:
        answer = _send_json(client, method, path, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["type"], error
    assert "Traceback" not in answer.text
    assert client.get("/health").status_code == 200


def test_a_cancelled_stream_stops_generating(client):
    """chat-b (two steps of training) does not stop before max_tokens: closing its stream after a few chunks must
    end the generation far earlier."""
    before = client.get("/health").json()["stats"]
    body = {"model": "chat-b", "prompt": "Tell a long story.", "max_tokens": 200, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as answer:
        for number, _ in enumerate(answer.iter_lines()):
            if number == 6:
                break
    for _ in range(100):
        after = client.get("/health").json()["stats"]
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < 150


def test_a_dropped_request_stops_every_one_of_its_rows(served, client):
    """16 prompts in one request, its client gone after 0.3 s: all 16 rows stop, not only the one awaited (the
    server notices within its 0.5 s poll, so well before the rows' 240 tokens: chat-b does not stop at EOS)."""
    before = client.get("/health").json()["stats"]
    body = {"model": "chat-b", "prompt": [f"Tell story {i}." for i in range(16)], "max_tokens": 240}
    with httpx.Client(base_url=served[0].url, timeout=0.3) as impatient, contextlib.suppress(httpx.TimeoutException):
        impatient.post("/v1/completions", json=body)
    for _ in range(200):
        after = client.get("/health").json()["stats"]
        if after["cancelled"] >= before["cancelled"] + 16:
            break
        time.sleep(0.05)
    assert after["cancelled"] == before["cancelled"] + 16
    assert after["tokens"] - before["tokens"] < 16 * 240 / 2


def test_a_poisoned_request_fails_alone_among_good_ones(served, client):
    """A request refused at the edge (a seed out of range, a lone surrogate) sent first, with good greedy ones (one
    of them seeded) arriving at once: it alone gets a 400, the others their right answers, as from `generate`."""
    _, paths = served
    requests = [{"instruction": i, "input": x} for i, x, _ in PAIRS]
    answers = instruct.respond(paths["instruct-tiny"], requests, max_new_tokens=12)
    poisoned = [{"seed": -1}, {"prompt": "\ud800"}, {"seed": 7}]  # the last is good: greedy, its seed unused
    results: dict[int, httpx.Response] = {}

    def send(number: int) -> None:
        i = number % len(requests)
        body = {"model": "instruct-tiny", "prompt": requests[i]["instruction"], "input": requests[i]["input"]}
        body |= {"max_tokens": 12} | (poisoned[number] if number < len(poisoned) else {})
        results[number] = _send_json(client, "POST", "/v1/completions", body)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results[n].status_code for n in range(12)] == [400, 400] + [200] * 10
    assert all("error" in results[n].json() for n in (0, 1))
    for n in range(2, 12):
        assert results[n].json()["choices"][0]["text"] == answers[n % len(requests)].response


def test_64_concurrent_clients_are_batched_and_all_answered_right(served, client, capsys):
    _, paths = served
    texts = [f"{message} #{i}" for i, message in enumerate(MESSAGES * 4)]
    requests = [{"instruction": i, "input": x} for i, x, _ in PAIRS]
    expected = {name: classify.predict(paths[name], texts) for name in ("spam-tiny", "spam-b")}
    answers = {name: instruct.respond(paths[name], requests, max_new_tokens=12) for name in ("instruct-tiny", "chat-b")}
    before = client.get("/health").json()["stats"]

    def one(client_number: int, turn: int) -> tuple[float, bool]:
        kind = (client_number + turn) % 4
        start = time.perf_counter()
        if kind < 2:
            name, i = ("spam-tiny", "spam-b")[kind], (client_number * 3 + turn) % len(texts)
            answer = client.post("/v1/classify", json={"model": name, "input": texts[i]})
            got, want = answer.json()["data"][0], expected[name][i]
            right = got["label"] == want.label and abs(got["score"] - want.score) < 1e-4
        else:
            name, i = ("instruct-tiny", "chat-b")[kind - 2], (client_number + turn) % len(requests)
            body = {
                "model": name,
                "prompt": requests[i]["instruction"],
                "input": requests[i]["input"],
                "max_tokens": 12,
            }
            answer = client.post("/v1/completions", json=body)
            right = answer.json()["choices"][0]["text"] == answers[name][i].response
        return time.perf_counter() - start, answer.status_code == 200 and right

    results: list[tuple[float, bool]] = []

    def run(client_number: int) -> None:
        results.extend(one(client_number, turn) for turn in range(4))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(64)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    seconds = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    stats = client.get("/health").json()["stats"]
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    with capsys.disabled():  # shown in the suite's output, not only with -s
        print(
            f"\nserve load test: {len(results)} requests from 64 clients in {seconds:.2f} s, p50 {p50 * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms, largest batch {stats['largest_batch']}"
        )
    assert len(results) == 256 and all(right for _, right in results)
    assert stats["requests"] - before["requests"] == 256 and stats["refused"] == before["refused"]
    assert stats["batches"] - before["batches"] < 256  # requests arriving together shared forward passes


def test_bench_serve_compares_batched_with_one_at_a_time(served):
    from lora_ft.bench import serving
    from lora_ft.core import report

    _, paths = served
    figures = serving.run([str(paths["spam-b"]), str(paths["chat-b"])], quick=True)
    assert set(figures["adapters"]) == {"spam-b", "chat-b"}
    for row in figures["adapters"].values():
        assert row["same_answers"] == 1.0 and row["batched"]["requests_per_second"] > 0
    assert "one at a time" in report.serve_bench(figures)


@pytest.fixture(scope="module")
def strict_server(served):
    """One adapter behind an API key, with room for one request at a time and two waiting."""
    _, paths = served
    server = Server(str(paths["chat-b"]), "--api-key", KEY, "--queue-size", "2", "--max-batch-size", "1")
    yield server
    server.stop()
    assert "Traceback" not in server.output, server.output


def test_api_key_is_required_on_v1_only(strict_server):
    url = strict_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        answer = httpx.get(url + "/v1/models", headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/health").json()["api_key_required"] is True
    assert httpx.get(url + "/").status_code == 200  # the page asks for the key itself


def test_a_full_queue_answers_503_and_recovers(strict_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "chat-b", "prompt": "Tell a long story.", "max_tokens": 40}
    statuses: list[int] = []

    def ask() -> None:
        statuses.append(
            httpx.post(strict_server.url + "/v1/completions", json=body, headers=headers, timeout=60).status_code
        )

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    assert set(statuses) == {200, 503}
    refused = httpx.post(strict_server.url + "/v1/completions", json=body | {"max_tokens": 1}, headers=headers)
    assert refused.status_code == 200
    assert httpx.get(strict_server.url + "/health").json()["stats"]["refused"] == statuses.count(503)


def test_port_in_use_is_one_line(served, tmp_path: Path):
    _, paths = served
    port = re.search(r":(\d+)$", served[0].url)[1]
    result = run_cli("serve", str(paths["spam-b"]), "--port", port, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --port {port} on 127.0.0.1 is in use (another server?): pick another one"


def test_page_in_headless_chromium(served, tmp_path: Path):
    """The page loads the models, classifies a message (label and bar) and streams an answer."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    wait = WebDriverWait(browser, 30)
    try:
        browser.get(served[0].url + "/")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#models li")) == 4)
        assert "4 adapters on 2 bases" in browser.find_element(By.ID, "summary").text
        browser.find_element(By.CSS_SELECTOR, '#models li[data-model="spam-tiny"]').click()
        expected = classify.predict(served[1]["spam-tiny"], MESSAGES[:2])
        for number, message in enumerate(MESSAGES[:2], 1):
            browser.find_element(By.ID, "text").clear()
            browser.find_element(By.ID, "text").send_keys(message)
            browser.find_element(By.ID, "classify").click()
            wait.until(lambda b, n=number: len(b.find_elements(By.CSS_SELECTOR, "#results .result")) == n)
        shown = browser.find_elements(By.CSS_SELECTOR, "#results .result")[::-1]  # the newest is on top
        for result, prediction in zip(shown, expected, strict=True):
            assert result.find_element(By.CLASS_NAME, "label").text == prediction.label
            width = float(result.find_element(By.CLASS_NAME, "bar-fill").value_of_css_property("width")[:-2])
            whole = float(result.find_element(By.CLASS_NAME, "bar").value_of_css_property("width")[:-2])
            assert width / whole == pytest.approx(prediction.score, abs=0.01)
        browser.save_screenshot(str(tmp_path / "classify.png"))

        browser.find_element(By.CSS_SELECTOR, '#models li[data-model="instruct-tiny"]').click()
        browser.find_element(By.ID, "instruction").send_keys(PAIRS[0][0])
        browser.find_element(By.ID, "answer-button").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))
        assert browser.find_element(By.ID, "answer").text == PAIRS[0][2]
        browser.save_screenshot(str(tmp_path / "answer.png"))
        with contextlib.suppress(OSError):  # for a person to look at
            shutil.copy(tmp_path / "classify.png", "/tmp/serve_screenshot.png")
            shutil.copy(tmp_path / "answer.png", "/tmp/serve_screenshot_answer.png")
    finally:
        browser.quit()
    assert httpx.get(served[0].url + "/health").json()["status"] == "ok"
