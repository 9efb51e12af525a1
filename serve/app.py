"""The OpenAI-compatible ASGI app: a thin adapter over the engine (parse, map errors, stream).

The model loads, and the golden check runs, in a thread after the server starts listening, so `/health` says
"loading" (503) until the artifact is ready, and never "ready" when the check fails on this machine. Model
steps run in the engine's thread; the event loop only awaits tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neodeploy.errors import ClosedError, NeodeployError, OverloadedError, UsageError
from neodeploy.runtime.engine import Engine, EngineConfig
from neodeploy.serve.chat import ChatTemplate, read_chat_template
from neodeploy.serve.metrics import Metrics
from neodeploy.serve.protocol import BadRequest, GenerationRequest, parse_chat, parse_completion

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeOptions:
    artifact: Path
    model_name: str | None = None  # default: the artifact folder's name
    api_key: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    skip_check: bool = False
    backend: str | None = None
    grace_period: float = 30.0  # seconds in-flight requests get on SIGTERM
    threads: int | None = None  # onnxruntime intra-op threads (default: onnxruntime's, all cores)
    replica: str | None = None  # sent back as X-Neodeploy-Replica (Ray sets it per replica)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name


class ServerState:
    def __init__(self, options: ServeOptions):
        self.options = options
        self.status = "loading"  # loading | ready | failed | draining
        self.error: str | None = None
        self.exit_code = 0
        self.model = self.engine = self.chat = None
        self.check: dict[str, Any] | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.on_failure = lambda: None  # the runner stops the server

    def load(self) -> None:
        from neodeploy.runtime import load
        from neodeploy.runtime.check import run_check

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
            template = read_chat_template(Path(options.artifact))
            tokenizer = model.tokenizer
            if template and tokenizer is not None:
                special = lambda i: tokenizer.backend.id_to_token(i) if i is not None else None  # noqa: E731
                self.chat = ChatTemplate(template, special(tokenizer.bos_token_id), special(tokenizer.eos_token_id))
            self.engine = Engine(model, options.engine, self.metrics)
            self.metrics.watch(self.engine)
            self.model = model
            self.status = "ready"
            print(f"neodeploy serve: {options.name} ready ({model.backend.name}, {model.manifest.precision}; "
                  f"{self.engine.max_running} running x {self.engine.capacity} tokens, KV cache "
                  f"{self.engine.kv_bytes / 2**20:.1f} MiB; check: {self.check})", file=sys.stderr, flush=True)
        except NeodeployError as exc:
            self._fail(str(exc), self.exit_code or 2)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported in one line, never served
            self._fail(f"loading {options.artifact} failed: {exc}", 2)

    def _fail(self, message: str, code: int) -> None:
        self.status, self.error, self.exit_code = "failed", message, code
        print(f"neodeploy: error: {message}", file=sys.stderr, flush=True)
        self.on_failure()


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def create_app(options: ServeOptions, state: ServerState | None = None) -> FastAPI:
    state = state or ServerState(options)

    async def lifespan(app):
        if state.status == "loading":  # not already loaded by the caller (Ray replicas load before they join)
            threading.Thread(target=state.load, name="neodeploy-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.close, options.grace_period)

    app = FastAPI(title="neodeploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.neodeploy = state

    replica = options.replica or f"{socket.gethostname()}:{os.getpid()}"

    @app.middleware("http")
    async def tag(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Neodeploy-Replica"] = replica  # which replica served it: see the spread behind a proxy
        return response

    @app.middleware("http")
    async def gate(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if options.api_key:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                    return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          "invalid_request_error", code="invalid_api_key")
            if state.status != "ready":
                state.metrics.rejected("unavailable")
                what = {"loading": "the model is still loading", "draining": "the server is shutting down"}.get(
                    state.status, f"the model failed to load: {state.error}")
                return error_response(503, f"{what}; retry later", "service_unavailable", code=state.status,
                                      headers={"Retry-After": str(RETRY_AFTER_S)})
        return await call_next(request)

    @app.exception_handler(NeodeployError)
    async def on_error(request: Request, exc: NeodeployError):
        if isinstance(exc, OverloadedError):
            state.metrics.rejected("overloaded")
            return error_response(429, str(exc), "rate_limit_exceeded", code="overloaded",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, ClosedError):
            state.metrics.rejected("unavailable")
            return error_response(503, str(exc), "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, ModelNotFound):
            return error_response(404, str(exc), "invalid_request_error", "model", "model_not_found")
        if isinstance(exc, PayloadTooLarge):
            return error_response(413, str(exc), "invalid_request_error", code="payload_too_large")
        state.metrics.rejected("invalid")
        if isinstance(exc, UsageError):
            return error_response(400, str(exc), "invalid_request_error", getattr(exc, "param", None))
        return error_response(500, str(exc), "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):  # unknown routes, wrong methods: JSON too
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind,
                              code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):  # a failed generation or a bug: still JSON, never HTML
        return error_response(500, str(exc) or type(exc).__name__, "server_error")

    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": options.name, "check": state.check}
        if state.error:
            body["error"] = state.error
        if state.engine is not None:
            body.update(running=state.engine.running, waiting=state.engine.waiting)
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.name, "object": "model", "created": state.created,
                                            "owned_by": "neodeploy", "max_model_len": state.engine.capacity}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, parse_completion(await _json(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(await _json(request))
        _served(req)  # another model is a 404 before anything about this one's template
        if state.chat is None:
            raise BadRequest("this artifact's tokenizer ships no chat template; use /v1/completions", "messages")
        prompt = state.chat.render(req.messages)
        return await _generate(request, dataclasses.replace(req, prompts=[prompt]))

    def _served(req: GenerationRequest) -> None:
        if req.model != options.name:
            raise ModelNotFound(f"model {req.model!r} does not exist; this server serves {options.name!r}")

    async def _generate(request: Request, req: GenerationRequest):
        _served(req)
        engine, model = state.engine, state.model
        for p in req.prompts:
            # No token is longer than the vocabulary's longest entry (x2 for normalisers that compose characters),
            # so text beyond that many characters per token of context cannot fit: refused before the tokenizer
            # spends seconds on it (10 MB took 13 s, and every other client waited; the bound is ~2 s of it at 2048 tokens).
            if isinstance(p, str) and model.tokenizer and len(p) > 2 * engine.capacity * model.tokenizer.longest_token:
                raise BadRequest(f"the prompt ({len(p)} characters) is far longer than the context of "
                                 f"{engine.capacity} tokens; shorten it", "prompt")
        encoded = [model.encode(p) for p in req.prompts]  # tokenizers holds the GIL: a thread would not help
        if req.kind == "chat" and not req.max_tokens_given:
            room = engine.capacity - len(encoded[0])
            if room < 1:
                raise BadRequest(f"the prompt ({len(encoded[0])} tokens) fills the context of {engine.capacity} "
                                 "tokens; shorten the conversation", "messages")
            req = dataclasses.replace(req, params=dataclasses.replace(req.params, max_new_tokens=room))
        handles = []
        try:
            for ids in encoded:
                for j in range(req.n):
                    params = req.params
                    if params.seed is not None and j:
                        params = dataclasses.replace(params, seed=params.seed + j)
                    handles.append(engine.submit(ids, params))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            return StreamingResponse(_stream(req, rid, encoded, handles), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, req, rid, encoded, handles)

    async def _complete(request, req, rid, encoded, handles):
        waiter = asyncio.ensure_future(asyncio.gather(*(_drain(h) for h in handles)))
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if not done and await request.is_disconnected():
                    raise asyncio.CancelledError
            results = waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
            for h in handles:
                h.cancel()  # a no-op for finished requests; frees the slots of a client that went away
        choices = []
        for index, (handle, generation) in enumerate(zip(handles, results)):
            prompt_text = state.model.decode(handle.prompt_ids) if req.echo else ""
            choices.append(_choice(req, index, prompt_text + generation.text, _finish(generation.finish_reason),
                                   generation.logprobs, generation.output_ids))
        body = {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": options.name, "choices": choices,
                "usage": _usage(encoded, results)}
        return JSONResponse(body)

    async def _drain(handle):
        async for _ in handle:
            pass
        return handle.result(0)

    async def _stream(req, rid, encoded, handles):
        kind = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        created = int(time.time())

        def chunk(choices, usage=None):
            body = {"id": rid, "object": kind, "created": created, "model": options.name, "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            for index, handle in enumerate(handles):
                if req.kind == "chat":
                    yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                elif req.echo:
                    yield chunk([_choice(req, index, state.model.decode(handle.prompt_ids), None, [], [])])
                async for delta in handle:
                    samples = [delta.sample] if req.logprobs is not None and delta.kept else []
                    finish = _finish(delta.finish_reason) if delta.finish_reason else None
                    if delta.text or delta.kept or finish:  # one chunk per token, even while its text is held back
                        yield chunk([_choice(req, index, delta.text, finish, samples,
                                             [delta.token] if samples else [], streaming=True)])
            if req.include_usage:
                yield chunk([], _usage(encoded, [h.result(0) for h in handles]))
            yield "data: [DONE]\n\n"
        except NeodeployError as exc:  # a request that failed mid-stream: say so in the stream, then end it
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        finally:
            for h in handles:
                h.cancel()  # the client went away (or we are done): free the slots

    def _choice(req, index, text, finish, samples, token_ids, streaming=False):
        if req.kind == "chat":
            content = {"role": "assistant", "content": text} if not streaming else ({"content": text} if text else {})
            choice = {"index": index, ("delta" if streaming else "message"): content, "finish_reason": finish,
                      "logprobs": _chat_logprobs(samples) if req.logprobs is not None else None}
            return choice
        return {"index": index, "text": text, "finish_reason": finish,
                "logprobs": _completion_logprobs(samples) if req.logprobs is not None else None}

    def _token(i: int) -> str:
        return state.model.decode([i]) if state.model.tokenizer else str(i)

    def _completion_logprobs(samples):
        tokens = [_token(s.token) for s in samples]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in samples],
                "top_logprobs": [{_token(i): lp for i, lp in s.top} for s in samples], "text_offset": offsets}

    def _chat_logprobs(samples):
        def entry(i, lp):
            t = _token(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}
                            for s in samples]}

    return app


class ModelNotFound(UsageError):
    """The request names a model this server does not serve (404)."""


class PayloadTooLarge(UsageError):
    """The request body is over MAX_BODY (413)."""


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def _usage(encoded, results) -> dict:
    prompt = sum(len(e) for e in encoded)
    completion = sum(len(g.output_ids) for g in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


MAX_BODY = 16 * 2**20  # 64 prompts of a 2048-token context as text or ids are under 1 MB


async def _json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"the request body ({int(declared)} bytes) is over {MAX_BODY} bytes; send less")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"the request body is over {MAX_BODY} bytes; send less")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from exc


def run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> int:
    """Serve until SIGTERM / Ctrl-C (drain: stop accepting, give in-flight requests the grace period, exit 0), or
    until loading fails (exit 2) or the golden check fails (exit 1)."""
    import uvicorn

    state = ServerState(options)
    app = create_app(options, state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.status == "ready":
                state.status = "draining"
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown (the process would die of SIGTERM):
            # a drain that completed is a clean exit, status 0.
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=options.grace_period,
                            access_log=False, lifespan="on")
    server = Server(config)

    def stop():
        server.should_exit = True

    state.on_failure = stop
    # Bound here, before saying so: uvicorn binds inside run(), logs a taken port and exits 3 after our line.
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, or a --host "
                         "this machine has") from exc
    print(f"neodeploy serve: listening on http://{host}:{port} (model {options.name!r}, loading {options.artifact})",
          file=sys.stderr, flush=True)
    server.run(sockets=[listener])
    return state.exit_code
