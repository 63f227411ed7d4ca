"""The HTTP side of `tracestar serve`: a Starlette app over one `Engine`.

    GET  /                      the app (static HTML, script and styles from this package)
    GET  /api/info              the index's manifest facts (model, dimension, V source, λ, coverage)
    POST /api/trace             {"prompt", "max_new_tokens"?, "target"?, "top_k"?} -> the trace as JSON
    POST /api/trace/stream      the same as server-sent events: one `token` event per generated token
                                as it is produced, then `result` (or `error`)
    POST /api/token             {"trace_id", "position"} -> that token's own proponents and opponents
    GET  /doc?trace=&doc=[&position=]   a document's full text with its heat map for the trace

Safety. Corpus text is untrusted: it reaches the page only as HTML escaped on the server by the
report's code (`tracestar.report.html.hit_list`) or as `textContent` set by the script, under a
Content-Security-Policy that allows scripts and styles from this server only (style attributes
are allowed for the score bars) and no other origin at all. Bodies are bounded (`MAX_BODY`
bytes, checked on Content-Length and while reading), and so is max_new_tokens. The Host header
must name the loopback address when the server is bound to it (no DNS rebinding), and a JSON
content type is required (no cross-site form posts). A malformed request gets a 4xx with a
one-line JSON `{"error": ...}`; an unexpected failure a 500 of the same form; the server stays up.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tracestar.errors import UserError
from tracestar.serve.engine import Busy, Engine, NotFound

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes of a request body
MAX_PROMPT_CHARS = 8000
MAX_TOP_K = 100
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}
_STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers={"cache-control": "no-store"})


# --- request bodies ------------------------------------------------------------------------------


async def read_json(request: Request, limit: int = MAX_BODY) -> dict:
    """The body as a JSON object: 415 without a JSON content type, 413 over `limit` bytes (refused
    from Content-Length before reading, or as soon as the bytes read pass it), 400 if not JSON."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"send the body as application/json (got {ctype or 'no content type'!r})")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"Content-Length is not a number: {length[:40]!r}")
        if int(length) > limit:
            raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise RequestError(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def _fields(data: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} (expected {', '.join(allowed)})")


def _int_field(data: dict, name: str, *, default: int | None, minimum: int, maximum: int, why: str = "") -> int:
    value = data.get(name)
    if value is None:
        if default is None:
            raise RequestError(400, f"field {name!r}: missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"field {name!r}: expected an integer, got {json.dumps(value)[:40]}")
    if not minimum <= value <= maximum:
        raise RequestError(400, f"field {name!r}: must be between {minimum} and {maximum}, got {value}{why}")
    return value


def _str_field(data: dict, name: str, *, required: bool, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(400, f"field {name!r}: missing")
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"field {name!r}: expected a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(400, f"field {name!r}: {len(value)} characters, at most {max_chars}")
    return value


def parse_trace(data: dict, engine: Engine) -> dict:
    """The keyword arguments of `Engine.trace` from a request body, every field checked."""
    _fields(data, ("prompt", "target", "max_new_tokens", "top_k"))
    prompt = _str_field(data, "prompt", required=True)
    target = _str_field(data, "target", required=False)
    if target == "":
        target = None  # an empty target box means "generate"
    bound = engine.max_new_tokens
    max_new = _int_field(data, "max_new_tokens", default=min(32, bound), minimum=1, maximum=bound,
                         why=" (the server's --max-new-tokens)")
    top_k = _int_field(data, "top_k", default=engine.top_k, minimum=1, maximum=MAX_TOP_K)
    return {"prompt": prompt, "target": target, "max_new_tokens": max_new, "top_k": top_k}


# --- handlers ------------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return (resources.files("tracestar.serve") / "static" / name).read_bytes()


async def index_page(request: Request) -> Response:
    return Response(_static("index.html"), media_type="text/html; charset=utf-8")


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "report.css":  # the report's own style sheet, so hit lists look the same in both
        from tracestar.report.html import REPORT_CSS

        return Response(REPORT_CSS, media_type="text/css; charset=utf-8")
    if name not in _STATIC or name == "index.html":
        raise RequestError(404, f"no static file {name[:60]!r}")
    return Response(_static(name), media_type=f"{_STATIC[name]}; charset=utf-8")


async def info(request: Request) -> Response:
    return JSONResponse(request.app.state.engine.info(), headers={"cache-control": "no-store"})


async def trace(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    args = parse_trace(await read_json(request), engine)
    result = await anyio.to_thread.run_sync(functools.partial(engine.trace, **args))
    return JSONResponse(result, headers={"cache-control": "no-store"})


async def trace_stream(request: Request) -> Response:
    """Server-sent events: `token` {position, id, token} as each token is produced, then `result`
    (the same object /api/trace answers) or `error` {status, error}. The work runs in its own
    thread under the model lock; a client that goes away does not stop it (it is bounded by
    max_new_tokens), so the lock is always released."""
    engine: Engine = request.app.state.engine
    args = parse_trace(await read_json(request), engine)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind: str | None, data: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def work() -> None:
        try:
            result = engine.trace(**args, on_token=lambda i, tid, text: emit("token", {"position": i, "id": tid, "token": text}))
            emit("result", result)
        except Busy as exc:
            emit("error", {"status": 503, "error": one_line(str(exc))})
        except UserError as exc:
            emit("error", {"status": 422, "error": one_line(str(exc))})
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            log.exception("trace failed")
            emit("error", {"status": 500, "error": one_line(f"internal error: {type(exc).__name__}: {exc}")})
        finally:
            emit(None, None)

    threading.Thread(target=work, name="tracestar-trace", daemon=True).start()

    async def events():
        while True:
            kind, data = await queue.get()
            if kind is None:
                return
            yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def token(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    data = await read_json(request)
    _fields(data, ("trace_id", "position"))
    trace_id = _str_field(data, "trace_id", required=True, max_chars=64)
    position = _int_field(data, "position", default=None, minimum=0, maximum=10**6)
    result = await anyio.to_thread.run_sync(engine.token, trace_id, position)
    return JSONResponse(result, headers={"cache-control": "no-store"})


async def document(request: Request) -> Response:
    from tracestar.serve.pages import document_page

    engine: Engine = request.app.state.engine
    q = request.query_params
    trace_id, doc_id, position, chunk = q.get("trace"), q.get("doc"), q.get("position"), q.get("chunk")
    if not trace_id or doc_id is None:
        raise RequestError(400, "give trace= and doc= (and position= for one token)")
    if position is not None and not position.isdigit():
        raise RequestError(400, f"position: expected a token position, got {position[:20]!r}")
    if chunk is not None and not chunk.isdigit():
        raise RequestError(400, f"chunk: expected a window number, got {chunk[:20]!r}")
    pos = int(position) if position is not None else None
    query, att = await anyio.to_thread.run_sync(engine.document, trace_id, doc_id, pos,
                                                int(chunk) if chunk is not None else None)
    page = document_page(engine, doc_id, query, att)
    return HTMLResponse(page, headers={"cache-control": "no-store"})


# --- errors, headers, the app ----------------------------------------------------------------------


async def _on_request_error(request: Request, exc: Exception) -> Response:
    return _error(exc.status, str(exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    return _error(exc.status_code, exc.detail or "error")


async def _on_user_error(request: Request, exc: Exception) -> Response:
    return _error(404 if isinstance(exc, NotFound) else 422, str(exc))


async def _on_busy(request: Request, exc: Exception) -> Response:
    return _error(503, str(exc))


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class SecurityHeaders:
    """Adds the CSP and friends to every response (set before any byte of the body is sent)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in _HEADERS.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(engine: Engine, *, host: str = "127.0.0.1") -> Starlette:
    """The app for an engine. Bound to a loopback address, it answers only requests whose Host
    header names one (a page elsewhere cannot reach it through DNS rebinding)."""
    routes = [
        Route("/", index_page),
        Route("/static/{name}", static_file),
        Route("/api/info", info),
        Route("/api/trace", trace, methods=["POST"]),
        Route("/api/trace/stream", trace_stream, methods=["POST"]),
        Route("/api/token", token, methods=["POST"]),
        Route("/doc", document),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if host in LOOPBACK:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK)))
    handlers = {RequestError: _on_request_error, HTTPException: _on_http_error, UserError: _on_user_error,
                Busy: _on_busy, Exception: _on_crash}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.engine = engine
    return app
