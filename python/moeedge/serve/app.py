"""The FastAPI application: routes, the API key, the body size limit, and every error in
OpenAI's shape {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import hmac
import json
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeedge.runtime.measure import rss_bytes
from moeedge.serve.engine import QueueFull, ShuttingDown
from moeedge.serve.generation import Served, chat_completions, completions, error_body, error_response
from moeedge.serve.metrics import ServerMetrics
from moeedge.serve.schemas import ChatRequest, CompletionRequest, RequestError

STATIC = resources.files("moeedge.serve") / "static"


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before the app reads it
    (by its Content-Length, or as it arrives when chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send)
            body.append(message)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(m.get("body", b"") for m in body),
                                        "more_body": False}], receive), send)

    async def _refuse(self, send):
        payload = json.dumps(error_body(f"the request body is over the limit of {self.max_bytes} bytes",
                                        "invalid_request_error", None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg', '')}", None
    if not loc:
        return f"the body must be a JSON object: {first.get('msg', '')}", None
    where = ".".join(loc)
    return f"{where}: {first.get('msg', 'invalid')}", loc[0]


def create_app(served, model, *, api_key: str | None = None, max_body_bytes: int = 4 << 20) -> FastAPI:
    """served: generation.Served (the engine and what the endpoints need); model: the MoeModel."""
    metrics = ServerMetrics(served.engine.snapshot, model)
    served.engine.observe = metrics.observe
    app = FastAPI(title="moeedge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.started = time.time()

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise StarletteHTTPException(401, "invalid API key: send it as 'Authorization: Bearer KEY'")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error_response(400, str(exc), "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return error_response(429, f"the server is busy: {exc}; retry later", "rate_limit_error", None,
                              "queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request, exc: ShuttingDown):
        return error_response(503, str(exc), "server_error", None, "shutting_down", headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), kind, None, code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    guard = [Depends(authorized)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def card() -> dict:
        return {"id": served.model_id, "object": "model", "created": int(app.state.started), "owned_by": "moeedge"}

    @app.get("/v1/models", dependencies=guard)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=guard)
    async def model_card(model_id: str):
        if model_id != served.model_id:
            raise StarletteHTTPException(404, f"no model {model_id!r} here; this server serves {served.model_id!r}")
        return card()

    @app.post("/v1/completions", dependencies=guard)
    async def _completions(req: CompletionRequest, request: Request):
        return await completions(served, req, request)

    @app.post("/v1/chat/completions", dependencies=guard)
    async def _chat(req: ChatRequest, request: Request):
        return await chat_completions(served, req, request)

    @app.get("/metrics", dependencies=guard)
    async def _metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/stats", dependencies=guard)
    async def stats():
        """The chat UI's stats line: the engine's figures, the cache's, the memory."""
        cache = model.cache.stats()
        gets = cache["hits"] + cache["misses"]
        return JSONResponse({**served.engine.snapshot(), "model": served.model_id,
                             "max_context": served.max_context,
                             "cache_hit_rate": cache["hits"] / gets if gets else 0.0,
                             "bytes_read": cache["bytes_read"], "process_bytes": rss_bytes(),
                             "budget_bytes": model.plan.budget_bytes})

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
