"""`studio`'s HTTP side: the page at /, its JSON API under /api (documented in docs/studio.md), and the finished
adapters under /v1 as `serve` serves them (serve/server.py's routes over the studio's registry). Errors are JSON in
`serve`'s shape, with `field` naming the form's setting when one setting is at fault."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..core.errors import UserError
from ..serve import pool, server
from .runner import Studio
from .workspace import MAX_UPLOAD_BYTES, Workspace, field_of, schema

LOOPBACK = ("127.0.0.1", "::1", "localhost")
EVENTS_POLL_S = 0.5  # how often a run's event stream looks for new progress
KEEPALIVE_S = 15.0
VENDOR = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css", "uPlot.LICENSE": "text/plain"}


class RunRequest(BaseModel):
    task: Any = None
    settings: Any = None


class RecipeText(BaseModel):
    text: str


class Paths(BaseModel):
    paths: list[str]


class Name(BaseModel):
    name: str


def _user_error(request: Request, e: UserError) -> JSONResponse:
    status = 404 if isinstance(e, pool.NotFound) else 400
    message = str(e).replace("`", "")
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return JSONResponse({"error": error | {"field": getattr(e, "field", None) or field_of(str(e))}}, status)


def _api(studio: Studio, workspace: Workspace) -> APIRouter:
    router = APIRouter()

    @router.get("/schema")
    def form(task: str = "spam") -> dict[str, Any]:
        return schema(task)

    @router.post("/check")
    def check(body: RunRequest) -> dict[str, Any]:
        values = workspace.check(body.task, body.settings)
        return {"ok": True, "recipe": workspace.recipe(body.task, values)}

    @router.post("/recipe")
    def load_recipe(body: RecipeText) -> dict[str, Any]:
        return workspace.read_recipe(body.text)

    @router.post("/uploads")
    async def upload(request: Request, name: str, task: str = "spam") -> dict[str, Any]:
        data = bytearray()
        async for chunk in request.stream():  # counted as it comes: a body without Content-Length is capped too
            data += chunk
            if len(data) > workspace.max_upload_bytes:
                raise server.ApiError(413, f"{name}: over the {workspace.max_upload_bytes:,} bytes an upload may be")
        path = await asyncio.to_thread(workspace.upload, name, bytes(data), task)
        return {"path": path}

    @router.post("/runs", status_code=201)
    def submit(body: RunRequest) -> dict[str, Any]:
        return {"id": studio.submit(body.task, body.settings)}

    @router.get("/runs")
    def listing() -> dict[str, Any]:
        return {"runs": studio.listing(), "adapters": workspace.listing()}

    @router.get("/runs/{run_id}")
    def view(run_id: str) -> dict[str, Any]:
        return studio.view(run_id)

    @router.get("/runs/{run_id}/log")
    def log(run_id: str) -> dict[str, Any]:
        return {"id": run_id, "log": studio.log(run_id)}

    @router.post("/runs/{run_id}/stop")
    def stop(run_id: str) -> dict[str, Any]:
        return studio.stop(run_id)

    @router.post("/runs/{run_id}/resume")
    def resume(run_id: str) -> dict[str, Any]:
        return studio.resume(run_id)

    @router.get("/runs/{run_id}/events")
    async def events(run_id: str, request: Request) -> StreamingResponse:
        studio.get(run_id)  # an unknown run is a 404 now, not an empty stream
        return StreamingResponse(_events(studio, run_id, request), media_type="text/event-stream")

    @router.get("/adapter")
    def details(path: str) -> dict[str, Any]:
        return workspace.details(path)

    @router.get("/files")
    def png(path: str) -> FileResponse:
        return FileResponse(workspace.png(path), media_type="image/png")

    @router.post("/compare")
    def compare(body: Paths) -> dict[str, Any]:
        return workspace.compare(body.paths)

    @router.post("/serve")
    def load(body: Name) -> dict[str, Any]:
        return studio.registry.load_named(body.name)

    return router


async def _events(studio: Studio, run_id: str, request: Request) -> Any:
    """The run's state and progress (`Studio.view`) whenever it changes, until the client goes away; a comment line
    now and then keeps idle connections open."""
    shown, quiet = None, 0.0
    while not await request.is_disconnected():
        view = await asyncio.to_thread(studio.view, run_id)
        text = json.dumps(view)
        if text != shown:
            shown, quiet = text, 0.0
            yield server._sse(view)
        elif quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield b": keep-alive\n\n"
        await asyncio.sleep(EVENTS_POLL_S)
        quiet += EVENTS_POLL_S


def create_app(
    folder: str | Path, api_key: str | None = None, parallel: int = 1, max_upload_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[FastAPI, Studio]:
    """The studio on the workspace `folder`: the app, and its runs (to `close` when the server stops)."""
    workspace = Workspace(folder, max_upload_bytes)
    studio = Studio(workspace, parallel)
    app = FastAPI(title="lora_ft studio", docs_url=None, redoc_url=None)
    app.add_middleware(server._BodyLimit, limit=max_upload_bytes + (64 << 10))
    if api_key is None:  # a studio without a key listens on loopback only, where a rebinding page would still reach it
        app.add_middleware(server._HostCheck, allowed=())
    server._install_errors(app)
    app.add_exception_handler(UserError, _user_error)
    guarded = [Depends(server._key_check(api_key))]
    app.include_router(_api(studio, workspace), prefix="/api", dependencies=guarded)
    app.include_router(server._routes(studio.registry), prefix="/v1", dependencies=guarded)
    web = resources.files("lora_ft").joinpath("web")
    page = web.joinpath("studio.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/vendor/{name}", include_in_schema=False)
    async def vendor(name: str) -> Response:
        if name not in VENDOR:
            return server._error(404, f"no file {name!r}", "not_found_error")
        return Response(web.joinpath("vendor", name).read_bytes(), media_type=VENDOR[name])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "workspace": str(workspace.root), "api_key_required": api_key is not None}

    return app, studio
