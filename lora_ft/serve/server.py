"""`serve`'s HTTP side: an OpenAI-compatible API (FastAPI, run by uvicorn) over pool.Registry, and the web page.
Every error is JSON, `{"error": {"message", "type", ...}}`: 4xx for the caller's mistakes, 503 when a queue is
full, 500 (without a traceback) for the server's own."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import AfterValidator, BaseModel, Field, Strict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..core import sandbox
from ..core.errors import UserError
from . import pool, sockets

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
BACKLOG = 2048  # connections the kernel holds before uvicorn accepts them (uvicorn's default)
KEEP_ALIVE_S = 5  # an idle connection between requests is closed after this (uvicorn's own timer)
bind = sockets.bind  # the listening socket, bound before the models load


def _valid_text(text: str) -> str:
    """Text the tokenizer can encode: a lone surrogate (JSON's "\\ud800", which no UTF-8 holds) is refused here, in
    the request's own 400, rather than failing inside a batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate ({text[e.start]!a}) at character {e.start}: not Unicode") from None
    return text


StrictStr = Annotated[str, Strict(), AfterValidator(_valid_text)]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictFloat = Annotated[float, Strict()]  # a JSON integer is accepted too


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class _Gone(Exception):
    """The client went away while its request waited: its job is cancelled, and nobody reads the answer."""


class _Sampling(BaseModel):
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(0.0, ge=0, le=2)  # lora_ft's default is greedy, as `generate`'s
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, lt=2**32)  # numpy's and torch's seeds, as `generate --seed`
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)  # one answer per prompt

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]  # the instruction, put in the training template (unless `raw`)
    input: StrictStr = ""  # lora_ft: the instruction's input (the template's "### Input:")
    raw: StrictBool = False  # lora_ft: the prompt as given, no template


class _Part(BaseModel):
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # those of training (developer: system)
    content: StrictStr | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer name of max_tokens

    def instruction(self) -> str:
        """The last user message: what an adapter trained on single instructions answers."""
        users = [m.text() for m in self.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: no user message to answer", code="no_user_message")
        return users[-1]

    def conversation(self) -> list[dict[str, str]]:
        """The messages as role and text, what an adapter trained on conversations answers (`developer` is OpenAI's
        newer name for `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class ClassifyRequest(BaseModel):
    model: StrictStr
    input: StrictStr | list[StrictStr]


class _Relay:
    """A job's events, handed from the worker thread to this request's coroutine."""

    def __init__(self) -> None:
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()

    def notify(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def next(self, request: Request, job: pool.Job) -> tuple[str, Any]:
        """The next event; a client that has gone away cancels the job (and gets nothing)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                if await request.is_disconnected():
                    job.cancel()
                    raise _Gone from None

    async def result(self, request: Request, job: pool.Job) -> Any:
        while True:
            kind, value = await self.next(request, job)
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(500, f"the batch failed: {value}", "server_error")


async def _submit(start: Any) -> tuple[pool.Job, _Relay]:
    """Queue a job made by `start(notify)`, in a worker thread: checking a request renders its prompt (in the
    template sandbox) and tokenizes it, which must not hold up the event loop (/health, other requests, signals).
    The registry's refusals become API errors."""
    relay = _Relay()
    try:
        return await run_in_threadpool(start, relay.notify), relay
    except pool.NotFound as e:
        raise ApiError(404, str(e).replace("`", ""), code="model_not_found") from None
    except UserError as e:
        raise ApiError(400, str(e).replace("`", "")) from None
    except pool.Busy as e:
        raise ApiError(503, str(e), "server_overloaded") from None


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def _validation_message(request: Request, error: RequestValidationError) -> str:
    found = error.errors()
    # A field that takes a string or a list (`input`, `prompt`) fails once per branch: our own check's message (a
    # lone surrogate) says more than the other branch's "not a valid string".
    first = next((e for e in found if e.get("type") == "value_error"), found[0])
    if "json" not in request.headers.get("content-type", ""):  # FastAPI reads a body as JSON only when it says so
        return "the body must be JSON, sent with Content-Type: application/json"
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {first.get('msg')}"


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.code)

    @app.exception_handler(RequestValidationError)  # FastAPI's 422 and its shape, in OpenAI's: a 400
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(request, e))

    @app.exception_handler(HTTPException)  # unknown paths, wrong methods, bodies over the size limit
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(_Gone)
    async def gone(request: Request, e: _Gone) -> JSONResponse:
        return _error(499, "the client closed the request", "client_closed")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}", "server_error")


class _BodyLimit:
    """ASGI middleware: a body whose Content-Length is over `limit` bytes is answered 413 in the API's JSON shape,
    unread. (FastAPI's own `max_body_size` on the API's routes stops a chunked one, with a plain-text 413.)"""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if length.isdigit() and int(length) > self.limit:
            await _error(413, f"the body is {length} bytes, over this server's {self.limit}")(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _QuietShutdown:
    """ASGI middleware: a request still running when shutdown's grace period ends is cancelled by uvicorn; it ends
    there quietly (its client's connection closes) instead of as an ASGI traceback in the log."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.app(scope, receive, send)


class _HostCheck:
    """ASGI middleware, when there is no API key: a request whose Host header names another host than localhost (or
    one given with --allowed-host; "*": any) is refused 421, so that a page whose name was made to resolve to this
    machine (DNS rebinding) cannot reach it from a browser. An IP address is always allowed: such a page sends its
    own name."""

    def __init__(self, app: Any, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {name.lower().rstrip(".") for name in allowed}

    def allows(self, host: str) -> bool:
        name = (host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host).lower()
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(name) is not None
        name = name.rstrip(".")
        return name == "localhost" or name.endswith(".localhost") or bool({name, "*"} & self.allowed)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        host = Headers(scope=scope).get("host") if scope["type"] == "http" else None
        if host is not None and not self.allows(host):
            why = "without --api-key, only localhost and IP addresses are (add names with --allowed-host)"
            refused = _error(421, f"Host {host[:100]!r} is not allowed: {why}", code="host_not_allowed")
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _usage(job: pool.Job, generated: int) -> dict[str, int]:
    prompt = sum(job.lengths)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _sse(value: Any) -> bytes:
    return format_sse_event(data_str=value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def _stream(request: Request, job: pool.Job, relay: _Relay, chunk: Any) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: `chunk(text, finish_reason)` per piece, then `data: [DONE]`. The
    job is cancelled however the stream ends, so a client that goes away stops its generation."""

    async def events() -> AsyncIterator[bytes]:
        try:
            yield _sse(chunk("", None))
            while True:
                kind, value = await relay.next(request, job)
                if kind == "text":
                    yield _sse(chunk(value, None))
                elif kind == "done":
                    yield _sse(chunk(None, value[1]) | {"usage": _usage(job, value[0].new_tokens)})
                    break
                else:
                    yield _sse({"error": {"message": f"the batch failed: {value}", "type": "server_error"}})
                    break
            yield _sse("[DONE]")
        except _Gone:
            pass
        finally:
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


def _routes(registry: pool.Registry) -> APIRouter:
    router = APIRouter()

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": registry.models()}

    @router.post("/classify")
    async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        job, relay = await _submit(lambda notify: registry.classify(body.model, texts, notify))
        predictions = await relay.result(request, job)
        data = [
            {"index": i, "label": p.label, "score": p.score, "truncated": p.truncated}
            for i, p in enumerate(predictions)
        ]
        return {"object": "list", "model": body.model, "data": data}

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "prompt: stream one prompt at a time", code="stream_one_prompt")
        if not 1 <= len(prompts) <= registry.limits.max_batch_size:
            raise ApiError(400, f"prompt: 1 to {registry.limits.max_batch_size} prompts, got {len(prompts)}")
        queued: list[tuple[pool.Job, _Relay]] = []
        try:
            for prompt in prompts:  # each its own row (not `request`: that is the client's, watched for a disconnect)
                row = {"instruction": prompt, "input": body.input, "raw": body.raw}
                queued.append(await _generate(registry, body, row))
        except BaseException:
            for job, _ in queued:  # all or nothing: the prompts already queued are not answered
                job.cancel()
            raise
        ident, created = _ids("cmpl")

        def chunk(text: str | None, finish: str | None, index: int = 0) -> dict[str, Any]:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
            return head | {"choices": [choice]}

        if body.stream:
            return _stream(request, *queued[0], chunk)
        try:
            answers = [await relay.result(request, job) for job, relay in queued]
        finally:  # a client gone (or a failed row) stops every row of the request, not just the one awaited
            for job, _ in queued:
                job.cancel()
        choices = [chunk(g.response, finish, i)["choices"][0] for i, (g, finish) in enumerate(answers)]
        usage = [_usage(job, g.new_tokens) for (job, _), (g, _) in zip(queued, answers, strict=True)]
        total = {k: sum(u[k] for u in usage) for k in usage[0]}
        return chunk("", None) | {"choices": choices, "usage": total}

    @router.post("/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        job, relay = await _generate(
            registry, body, {"instruction": body.instruction(), "messages": body.conversation()}
        )
        ident, created = _ids("chatcmpl")

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text == "" else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
            return head | {"choices": [choice]}

        if body.stream:
            return _stream(request, job, relay, chunk)
        generation, finish = await relay.result(request, job)
        message = {"role": "assistant", "content": generation.response}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        head = {"id": ident, "object": "chat.completion", "created": created, "model": body.model}
        return head | {"choices": [choice], "usage": _usage(job, generation.new_tokens)}

    return router


async def _generate(registry: pool.Registry, body: _Sampling, request: dict[str, Any]) -> tuple[pool.Job, _Relay]:
    request["stream"] = body.stream
    sampling = body.sampling()
    return await _submit(lambda notify: registry.generate(body.model, request, body.max_tokens, sampling, notify))


def _key_check(api_key: str | None) -> Any:
    """A dependency: with `api_key`, every /v1/ request carries `Authorization: Bearer KEY`."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")

    return check


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    sandbox.stop()  # renders still running end now: their threads would hold the process's exit for up to their bound


def create_app(registry: pool.Registry, api_key: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The API under /v1 (behind `api_key` when given), /health, and the page at /. Without a key, only requests for
    localhost, an IP address or one of `allowed_hosts` ("*": any) are answered (see _HostCheck)."""
    limits = registry.limits
    body_limit = 4 * limits.max_input_chars * limits.max_batch_size + (64 << 10)  # UTF-8 and JSON around the texts
    app = FastAPI(title="lora_ft serve", docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.add_middleware(_BodyLimit, limit=body_limit)
    app.add_middleware(_QuietShutdown)
    if api_key is None:
        app.add_middleware(_HostCheck, allowed=allowed_hosts)  # the outermost: before anything else is done
    _install_errors(app)
    dependencies = [Depends(_key_check(api_key))]
    app.include_router(_routes(registry), prefix="/v1", dependencies=dependencies, max_body_size=body_limit)
    page = resources.files("lora_ft").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        limits_shown = {k: getattr(limits, k) for k in limits.__dataclass_fields__}
        stats = registry.stats.snapshot()
        return {"status": "ok", "models": list(registry.adapters), "memory": registry.memory(), "stats": stats} | {
            "limits": limits_shown,
            "api_key_required": api_key is not None,
        }

    return app


def _raw_error(status: int, message: str) -> bytes:
    """A whole HTTP response, the API's JSON error, for the connection's own layer to write before it closes."""
    body = _error(status, message).body
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


def run(
    app: FastAPI, sock: socket.socket, log_level: str = "info", header_s: float = 10, body_s: float | None = 60
) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's graceful shutdown: open streams get 5 s to finish), each request's
    head and body within their deadlines (sockets.connections), an idle connection closed after KEEP_ALIVE_S."""
    import uvicorn

    protocol = sockets.connections(header_s, body_s, _raw_error)
    options = {"timeout_graceful_shutdown": 5, "timeout_keep_alive": KEEP_ALIVE_S, "server_header": False}
    config = uvicorn.Config(app, http=protocol, log_level=log_level, **options)
    uvicorn.Server(config).run(sockets=[sock])
