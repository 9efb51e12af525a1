"""The OpenAI-compatible ASGI app: options, the server's state, the gate in front, the error map, the route table.

The model loads, and the golden check runs, in a thread after the server starts listening, so `/health` says
"loading" (503) until the artifact is ready, and never "ready" when the check fails on this machine. Model
steps run in the engine's thread, tokenising in worker threads; the event loop only parses, routes and streams.
The handlers live in `serve/handlers.py`, the JSON shapes in `serve/protocol.py`, the process in `serve/server.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neodeploy import __version__
from neodeploy.core.errors import ClosedError, NeodeployError, OverloadedError, UsageError
from neodeploy.core.tokenizer import read_chat_template
from neodeploy.serve.chat import ChatTemplate
from neodeploy.serve.metrics import Metrics
from neodeploy.serve.options import ServeOptions
from neodeploy.serve.protocol import error_body

RETRY_AFTER_S = 1
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Routes open without the API key (probes, scrapers, the API's description); every other path needs it, so a
# route added later is closed by default.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/"})
STATIC = Path(__file__).parent / "static"  # the playground's files, shipped as package data (no CDN, no build step)
log = logging.getLogger("neodeploy.serve")


class ServerState:
    def __init__(self, options: ServeOptions):
        self.options = options
        self.status = "loading"  # loading | ready | failed | draining
        self.error: str | None = None  # the whole reason, for the log
        self.public_error: str | None = None  # what unauthenticated probes see: no paths, no internals
        self.exit_code = 0
        self.model = self.engine = self.chat = None
        self.check: dict[str, Any] | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.on_failure = lambda: None  # the runner stops the server

    def load(self) -> None:
        from neodeploy.runtime import load
        from neodeploy.runtime.check import run_check
        from neodeploy.runtime.engine import Engine

        options = self.options
        try:
            model = load(options.artifact, backend=options.backend, threads=options.threads)
            if options.skip_check:
                self.check = {"skipped": True}
            else:
                start = time.perf_counter()
                results = run_check(model)
                failed = [r for r in results if not r.passed]
                self.check = {"passed": not failed, "seconds": round(time.perf_counter() - start, 3),
                              "cases": len(results), "skipped": False}
                if failed:
                    self.exit_code = 1
                    raise NeodeployError(f"golden check failed on case {failed[0].case!r} "
                                         f"({'; '.join(failed[0].failures)}): the artifact drifted on this machine; "
                                         "refusing to serve (re-export, or --skip-check to serve anyway)")
            template = options.chat_template or read_chat_template(Path(options.artifact))
            tokenizer = model.tokenizer
            if template and tokenizer is not None:
                special = lambda i: tokenizer.backend.id_to_token(i) if i is not None else None  # noqa: E731
                self.chat = ChatTemplate(template, special(tokenizer.bos_token_id), special(tokenizer.eos_token_id))
            chat = ("from --chat-template" if options.chat_template else "from the artifact") if self.chat else \
                "none: chat completions answer 400"
            self.engine = Engine(model, options.engine)
            if self.engine.prefix is not None:
                self.engine.prefix.warm()  # its memory touched now, not page by page while requests wait
            if not options.skip_check:
                self._check_engine(model)
            self.engine.observer = self.metrics  # from here on: the gate's own requests are not the server's traffic
            self.metrics.watch(self.engine)
            self.model = model
            self.status = "ready"
            prefix = f"{self.engine.prefix.budget / 2**20:.0f} MiB" if self.engine.prefix else "off"
            print(f"neodeploy serve: {options.name} ready ({model.backend.name}, {model.manifest.precision}; "
                  f"{self.engine.max_running} running x {self.engine.capacity} tokens, KV cache "
                  f"{self.engine.kv_bytes / 2**20:.1f} MiB; prefix cache {prefix}; chat template: {chat}; "
                  f"check: {self.check})", file=sys.stderr, flush=True)
        except NeodeployError as exc:
            self._fail(str(exc), self.exit_code or 2)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported in one line, never served
            self._fail(f"loading {options.artifact} failed: {exc}", 2)

    def _check_engine(self, model) -> None:
        """The golden prompts through the engine as configured (batching, the prefix cache warm): no optimisation
        may change an output on this machine. Refused like a drifted artifact (exit 1)."""
        from neodeploy.runtime.check import run_engine_check

        start = time.perf_counter()
        failures = run_engine_check(model, self.engine)
        if failures:
            self.engine.close()
            self.exit_code = 1
            ways = ((["--no-prefix-cache"] if self.engine.prefix is not None else [])
                    + (["no --speculate"] if self.engine.speculator is not None else []) + ["--skip-check to serve anyway"])
            raise NeodeployError(f"the engine check failed: {failures[0]}; refusing to serve ({', or '.join(ways)})")
        self.check["engine_seconds"] = round(time.perf_counter() - start, 3)

    def _fail(self, message: str, code: int) -> None:
        self.status, self.error, self.exit_code = "failed", message, code
        self.public_error = ("the golden check failed on this machine" if code == 1 else "the model failed to load") + \
            "; the server's log says why"
        print(f"neodeploy: error: {message}", file=sys.stderr, flush=True)
        self.on_failure()


# ---------------------------------------------------------------------------------------------- errors -> HTTP

class ModelNotFound(UsageError):
    """The request names a model this server does not serve (404)."""


class PayloadTooLarge(UsageError):
    """The request body is over MAX_BODY (413)."""


class RequestTimeout(UsageError):
    """The request body did not arrive within the body timeout (408)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None
    outcome: str | None  # neodeploy_requests_total{outcome="rejected_<outcome>"}; None: the engine counted it

    def response(self, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        if self.status in (429, 503):
            headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
        if self.status in (408, 413):  # the rest of the body is not read: this connection cannot carry another request
            headers = {"Connection": "close", **(headers or {})}
        return JSONResponse(error_body(message, self.type, param, self.code), status_code=self.status, headers=headers)


# The one map from an exception to a status: first match wins (subclasses before their bases).
ERRORS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (OverloadedError, ErrorKind(429, "rate_limit_exceeded", "overloaded", "overloaded")),
    (ClosedError, ErrorKind(503, "service_unavailable", "draining", "unavailable")),
    (ModelNotFound, ErrorKind(404, "invalid_request_error", "model_not_found", "not_found")),
    (PayloadTooLarge, ErrorKind(413, "invalid_request_error", "payload_too_large", "too_large")),
    (RequestTimeout, ErrorKind(408, "invalid_request_error", "request_timeout", "timeout")),
    (UsageError, ErrorKind(400, "invalid_request_error", None, "invalid")),  # BadRequest, TemplateError, TokenizerError
    (NeodeployError, ErrorKind(500, "server_error", None, None)),  # ModelOutputError: a broken artifact, said so
)
UNAUTHORIZED = ErrorKind(401, "invalid_request_error", "invalid_api_key", "unauthorized")
BAD_HOST = ErrorKind(400, "invalid_request_error", "invalid_host", "invalid")
MEDIA_TYPE = ErrorKind(415, "invalid_request_error", "unsupported_media_type", "invalid")
UNAVAILABLE = ERRORS[1][1]
INTERNAL = ErrorKind(500, "server_error", "internal_error", None)


def error_response(state: ServerState, exc: BaseException) -> JSONResponse:
    """The response for any exception a handler raises, counted in the metrics. A bug's text stays in the log: the
    client gets a request id to quote."""
    for kind, error in ERRORS:
        if isinstance(exc, kind):
            state.metrics.rejected(error.outcome)
            return error.response(str(exc), getattr(exc, "param", None))
    return internal_error(exc)


def logged_bug(exc: BaseException) -> str:
    """Log a bug's traceback once under a request id; the client's message quotes the id, not the internals."""
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s failed", request_id, exc_info=exc)
    return f"internal error (request {request_id}); the server's log has the details"


def internal_error(exc: BaseException) -> JSONResponse:
    return INTERNAL.response(logged_bug(exc))


# ---------------------------------------------------------------------------------------------- the gate

class Guard:
    """Pure ASGI middleware (Starlette's decorator-style HTTP middleware would hide a client's disconnect from the handlers), reading
    only the raw ASGI scope (`request.url` is rebuilt from the Host header on older Starlette: a `Host: x/y` once
    moved the path past the key check). In order: the Host name (DNS rebinding), the API key, readiness, the
    Content-Type of a POST (a cross-site "simple" text/plain POST needs no preflight). Tags every response with
    the replica that served it."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.replica = (state.options.replica or f"{socket.gethostname()}:{os.getpid()}").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-neodeploy-replica", self.replica)]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is None:
            return await self.app(scope, receive, tagged)
        kind, message = refusal
        self.state.metrics.rejected(kind.outcome)
        await kind.response(message)(scope, receive, tagged)

    def refusal(self, scope) -> tuple[ErrorKind, str] | None:
        options, state = self.state.options, self.state
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if options.allowed_hosts is not None and host not in options.allowed_hosts:
            return BAD_HOST, (f"Host {host!r} is not a name this server answers to; start it with --allowed-hosts "
                              f"{host or 'NAME'} to serve it")
        path = scope["path"]
        if path in OPEN_PATHS or path.startswith("/static/") or scope["method"] == "OPTIONS":
            return None
        if options.api_key and not _key_matches(headers.get(b"authorization", b""), options.api_key):
            return UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer KEY'"
        if state.status != "ready":
            what = {"loading": "the model is still loading", "draining": "the server is shutting down"}.get(
                state.status, state.public_error or "the model failed to load")
            return UNAVAILABLE, f"{what}; retry later"
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return MEDIA_TYPE, f"send the body as JSON with 'Content-Type: application/json' (got {media.decode('latin-1')!r})"
        return None


def _host_name(host: str) -> str:
    """The name of a Host header without its port: 'a:8000' -> 'a', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _key_matches(header: bytes, key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235); the raw bytes compared in constant time with
    the key's UTF-8 (a non-ASCII key works as clients send it)."""
    scheme, _, token = header.strip().partition(b" ")
    return hmac.compare_digest(token.strip() if scheme.lower() == b"bearer" else b"", key.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- the app

def create_app(options: ServeOptions, state: ServerState | None = None) -> FastAPI:
    """One ASGI app for both deployments (uvicorn here, Ray Serve's proxy there)."""
    from neodeploy.serve import handlers, schema

    state = state or ServerState(options)

    async def lifespan(app):
        if state.status == "loading":  # not already loaded by the caller (Ray replicas load before they join)
            threading.Thread(target=state.load, name="neodeploy-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.close, options.grace_period)

    app = FastAPI(title="neodeploy", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json",
                  description="OpenAI-compatible completions and chat completions over one exported model.")
    app.state.neodeploy = state
    for method, path, handler, response_model in handlers.ROUTES:
        if handler is handlers.playground and not options.ui:
            continue
        errors = {"4XX": {"model": schema.ErrorResponse}, "5XX": {"model": schema.ErrorResponse}}
        app.add_api_route(path, handlers.endpoint(handler, state), methods=[method], response_model=None,
                          responses={200: {"model": response_model}, **errors} if response_model else errors,
                          summary=(handler.__doc__ or "").strip().splitlines()[0] or None)

    if options.ui:
        from starlette.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):  # unknown routes, wrong methods: JSON too
        kind = ErrorKind(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error",
                         {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                         {404: "not_found"}.get(exc.status_code, "invalid"))
        state.metrics.rejected(kind.outcome)
        return kind.response(f"{request.method} {request.scope['path']}: {exc.detail}", headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):  # only what escaped the handlers' own wrapper
        return internal_error(exc)

    app.openapi = lambda: _openapi(app)
    app.add_middleware(Guard, state=state)
    if options.cors_origins:  # outermost: a browser's preflight is answered before the key is asked for
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document with the request bodies our parser reads (the handlers take the raw request, so that a
    wrong field gets OpenAI's error shape, not FastAPI's 422)."""
    from neodeploy.serve.schema import REQUEST_MODELS

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in REQUEST_MODELS.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = doc
    return app.openapi_schema
