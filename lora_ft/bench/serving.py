"""`bench --serve ADAPTER ...`: how many requests a second `serve` answers, batching concurrent requests (up to
`max_batch_size` rows per forward pass) against one request at a time (`max_batch_size` 1), on the same loaded
adapters, through the whole HTTP stack (uvicorn in a thread of this process, 16 client threads). Inputs are each
adapter's own test split; generation is greedy, so both ways must give the same answers: the figures say how many
did."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .. import data
from ..serve import pool, server
from ..tasks import task_code

CLIENTS = 16  # concurrent client threads
PROMPT_END = data.format_prompt("i").rsplit("i", 1)[1]  # what ends a templated prompt ("### Response:")


def run(paths: list[str], quick: bool = False, batch_size: int = 16) -> dict[str, Any]:
    """Requests per second and latency of each adapter, batched against one at a time."""
    registry = pool.load(paths, pool.Limits(max_batch_size=batch_size))
    count, max_tokens = (32, 16) if quick else (96, 32)
    figures: dict[str, Any] = {"quick": quick, "clients": CLIENTS, "memory": registry.memory(), "adapters": {}}
    with _serving(registry) as url:
        for name, adapter in registry.adapters.items():
            requests = _requests(adapter, count, max_tokens)
            modes = {}
            for mode, size in (("batched", batch_size), ("one_at_a_time", 1)):
                registry.set_limits(replace(registry.limits, max_batch_size=size))
                modes[mode] = _measure(url, requests)
            answers = [m.pop("answers") for m in modes.values()]
            batched, single = modes["batched"], modes["one_at_a_time"]
            figures["adapters"][name] = {
                "task": adapter.manifest.task,
                "requests": len(requests),
                "max_tokens": requests[0][1].get("max_tokens"),  # None: a classifier's requests have none
                **modes,
                "speedup": batched["requests_per_second"] / single["requests_per_second"],
                "same_answers": sum(a == b for a, b in zip(*answers, strict=True)) / len(requests),
            }
    return figures


def _requests(adapter: pool.Adapter, count: int, max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """`count` requests on the adapter's own test inputs (repeated when the split is smaller)."""
    inputs = task_code.get(adapter.task.name).check_texts(adapter.manifest, count)
    inputs = [inputs[i % len(inputs)] for i in range(count)]
    return REQUESTS[adapter.task.serves](adapter.name, inputs, max_tokens)


def _classify_requests(name: str, inputs: list[str], max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    return [("/v1/classify", {"model": name, "input": text}) for text in inputs]


def _completion_requests(name: str, inputs: list[str], max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    prompts = [text[: text.index(PROMPT_END) + len(PROMPT_END)] if PROMPT_END in text else text for text in inputs]
    body = {"model": name, "max_tokens": max_tokens, "raw": True}
    return [("/v1/completions", body | {"prompt": prompt}) for prompt in prompts]


# The requests for what a task serves (`core.registry.Task.serves`), as `serve.batches.RUNS` answers them.
REQUESTS = {"classify": _classify_requests, "generate": _completion_requests}


def _measure(url: str, requests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """All `requests` sent by CLIENTS threads, each taking the next one as soon as its last is answered."""
    answers: list[Any] = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    pending = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(pending, None)
            if i is None:
                return
            started = time.perf_counter()
            answers[i] = _post(url, *requests[i])
            latencies[i] = time.perf_counter() - started

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "seconds": seconds,
        "requests_per_second": len(requests) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "answers": answers,
    }


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    """The answer's label or text (the part both ways must agree on)."""
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    return answer["data"][0]["label"] if "data" in answer else answer["choices"][0]["text"]


@contextlib.contextmanager
def _serving(registry: pool.Registry) -> Iterator[str]:
    """The registry's API on a free port of 127.0.0.1, served by uvicorn in a thread while the block runs."""
    import uvicorn

    sock = server.bind("127.0.0.1", 0)
    sock.listen(server.BACKLOG)
    uvicorn_server = uvicorn.Server(uvicorn.Config(server.create_app(registry), log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
        sock.close()
