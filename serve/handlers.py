"""The route handlers: small async functions of (state, request), one per route, listed in ROUTES.

`endpoint` wraps each in the one exception wrapper (every error becomes its mapped JSON response, counted once and
logged once). A generation request goes: parse (protocol.py) -> tokenise in a worker thread -> submit to the
engine -> wait (non-streaming) or stream, racing the client's connection: a client that goes away cancels its
requests at the next step, whether it was streaming, waiting for a whole answer, or still queued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from neodeploy.core.errors import ClosedError, NeodeployError
from neodeploy.serve import schema
from neodeploy.serve.app import (STATIC, ModelNotFound, PayloadTooLarge, RequestTimeout, ServerState, error_response,
                                  logged_bug)
from neodeploy.serve.protocol import (DONE_EVENT, BadRequest, GenerationRequest, choice, chunk_event, error_event,
                                      finish_reason, parse_chat, parse_completion, parse_detokenize, parse_tokenize,
                                      response_body, role_chunk, usage)

MAX_BODY = 16 * 2**20  # 64 prompts of a 2048-token context as text or ids are under 1 MB


class ClientGone(Exception):
    """The client closed its connection: nothing more is sent, its requests are cancelled."""


def endpoint(handler: Callable[[ServerState, Request], Awaitable[Response]], state: ServerState):
    async def run(request: Request) -> Response:
        try:
            return await handler(state, request)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it: the connection is gone
        except Exception as exc:  # noqa: BLE001 - the one place an error becomes a response
            return error_response(state, exc)

    run.__name__ = handler.__name__
    return run


# ---------------------------------------------------------------------------------------------- plain routes

async def health(state: ServerState, request: Request) -> Response:
    """Readiness: 200 once loaded and checked; 503 while loading, draining or after a failed load."""
    body: dict[str, Any] = {"status": state.status, "model": state.options.name, "check": state.check,
                            "api_key_required": bool(state.options.api_key)}
    if state.public_error:
        body["error"] = state.public_error
    if state.engine is not None:
        body.update(running=state.engine.running, waiting=state.engine.waiting)
    return JSONResponse(body, status_code=200 if state.status == "ready" else 503)


async def metrics(state: ServerState, request: Request) -> Response:
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(state: ServerState, request: Request) -> Response:
    """The one model this server serves, with its facts under `neodeploy` (what the playground shows)."""
    model = state.model
    manifest = model.manifest
    facts = {"family": manifest.spec.family, "parameters": manifest.spec.num_parameters(),
             "precision": manifest.precision, "target": manifest.onnx.target, "backend": model.backend.name,
             "chat_template": state.chat is not None, "check": state.check}
    return JSONResponse({"object": "list", "data": [{"id": state.options.name, "object": "model",
                                                     "created": state.created, "owned_by": "neodeploy",
                                                     "max_model_len": state.engine.capacity, "neodeploy": facts}]})


async def playground(state: ServerState, request: Request) -> Response:
    """The playground page (not routed with --no-ui)."""
    # Everything the page loads or calls is this server: the browser enforces it.
    policy = "default-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:"
    return FileResponse(STATIC / "playground.html", headers={"Content-Security-Policy": policy,
                                                             "Cache-Control": "no-cache"})


async def completions(state: ServerState, request: Request) -> Response:
    """Text completions (OpenAI's legacy completions API)."""
    return await generate(state, request, parse_completion(await read_json(request, state.options.body_timeout)))


async def chat_completions(state: ServerState, request: Request) -> Response:
    """Chat completions, rendered with the artifact's chat template."""
    req = parse_chat(await read_json(request, state.options.body_timeout))
    served(state, req.model)  # another model is a 404 before anything about this one's template
    if state.chat is None:
        raise BadRequest(NO_TEMPLATE, "messages")
    return await generate(state, request, req)


NO_TEMPLATE = ("this artifact has no chat template: export it with --chat-template FILE|chatml, or serve it with "
               "--chat-template FILE; or use /v1/completions")


async def tokenize(state: ServerState, request: Request) -> Response:
    """Text (or chat messages) to token ids, as vLLM's /tokenize."""
    body = await read_json(request, state.options.body_timeout)
    req = parse_tokenize(body)
    served(state, req.model)
    if req.kind == "chat" and state.chat is None:
        raise BadRequest(NO_TEMPLATE, "messages")
    ids = (await asyncio.to_thread(prompt_ids, state, req))[0]
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.engine.capacity})


async def detokenize(state: ServerState, request: Request) -> Response:
    """Token ids to text, as vLLM's /detokenize."""
    body = await read_json(request, state.options.body_timeout)
    model, tokens = parse_detokenize(body)
    served(state, model)
    if len(tokens) > 4 * state.engine.capacity:
        raise BadRequest(f"{len(tokens)} tokens are far more than this model's context of {state.engine.capacity}; "
                         "send fewer", "tokens")

    def decode() -> str:
        state.model.encode(tokens)  # refuses ids outside the vocabulary
        return state.model.decode(tokens)

    return JSONResponse({"prompt": await asyncio.to_thread(decode)})


ROUTES = (
    ("GET", "/", playground, None),
    ("GET", "/health", health, schema.Health),
    ("GET", "/metrics", metrics, None),
    ("GET", "/v1/models", models, schema.ModelList),
    ("POST", "/v1/completions", completions, schema.Completion),
    ("POST", "/v1/chat/completions", chat_completions, schema.ChatCompletion),
    ("POST", "/tokenize", tokenize, schema.Tokens),
    ("POST", "/detokenize", detokenize, schema.Text),
)


# ---------------------------------------------------------------------------------------------- the body

async def read_json(request: Request, timeout: float) -> Any:
    """The body as JSON, read up to MAX_BODY bytes (a chunked upload is cut off at the limit, not read whole) and
    within `timeout` seconds (a Content-Length longer than what is sent is a 408, not an open connection)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"the request body ({int(declared)} bytes) is over {MAX_BODY} bytes; send less")

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise PayloadTooLarge(f"the request body is over {MAX_BODY} bytes; send less")
        return bytes(body)

    try:
        body = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s; send it whole") from None
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest("the request body nests too deeply; flatten it") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None


# ---------------------------------------------------------------------------------------------- generation

def served(state: ServerState, model: str) -> None:
    if model != state.options.name:
        raise ModelNotFound(f"model {model!r} does not exist; this server serves {state.options.name!r}")


def prompt_ids(state: ServerState, req: GenerationRequest) -> list[list[int]]:
    """Render (chat) and tokenise, in a worker thread: tokenizers releases the GIL, so the loop keeps serving.
    Text far beyond the context is refused from its length first: no token is longer than the vocabulary's longest
    entry (x2 for normalisers that compose characters), so past that many characters per token of context a prompt
    cannot fit; the whole request is held to the same bound (six 2 M-character prompts once took 22 s)."""
    model, engine = state.model, state.engine
    prompts = req.prompts if req.kind == "completion" else [render_chat(state, req)]
    if model.tokenizer is not None:
        bound = 2 * engine.capacity * model.tokenizer.longest_token
        text = [p for p in prompts if isinstance(p, str)]
        longest = max(text, key=len, default="")
        if len(longest) > bound:
            raise BadRequest(f"the prompt ({len(longest)} characters) is far longer than the context of "
                             f"{engine.capacity} tokens; shorten it", "messages" if req.kind == "chat" else "prompt")
        if sum(map(len, text)) > bound:
            raise BadRequest(f"the prompts ({sum(map(len, text))} characters together) are far more than this server "
                             f"tokenises for one request ({bound}); send them in several requests", "prompt")
    return [model.encode(p) for p in prompts]


def render_chat(state: ServerState, req: GenerationRequest) -> str:
    messages, tools = req.messages, req.tools.offered if req.tools else None
    if tools and not state.chat.takes_tools:
        messages, tools = [{"role": "system", "content": req.tools.system_note()}, *messages], None
    return state.chat.render(messages, tools)


def submit_all(state: ServerState, req: GenerationRequest, encoded: list[list[int]]) -> list:
    """n handles per prompt, all or none (a refusal cancels what was already queued)."""
    engine = state.engine
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
    return handles


async def generate(state: ServerState, request: Request, req: GenerationRequest) -> Response:
    served(state, req.model)
    engine = state.engine
    limit = engine.max_running + engine.config.max_waiting
    generations = len(req.prompts or [None]) * req.n  # chat: one rendered prompt
    if generations > limit:
        raise BadRequest(f"n x prompts = {generations} generations can never be in flight at "
                         f"once on this server (max_running + max_waiting = {limit}); lower n or send fewer prompts", "n")
    encoded = await asyncio.to_thread(prompt_ids, state, req)
    if req.kind == "chat" and not req.max_tokens_given:
        room = engine.capacity - len(encoded[0])
        if room < 1:
            raise BadRequest(f"the prompt ({len(encoded[0])} tokens) fills the context of {engine.capacity} "
                             "tokens; shorten the conversation", "messages")
        req = dataclasses.replace(req, params=dataclasses.replace(req.params, max_new_tokens=room))
    # In a worker: submit validates token ids and starts each sequence's grammar matcher (a copy of the compiled
    # one, or a compile if the cache dropped it), neither of which may hold up the loop.
    handles = await asyncio.to_thread(submit_all, state, req, encoded)
    connection = Connection(request.receive)
    rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
    if not req.stream:
        return await complete(state, req, rid, encoded, handles, connection)  # it releases the handles itself
    # The status line goes out now, not with the first token: a queued stream's client sees the request taken.
    def release() -> None:  # also when the stream never starts (its generator's finally would not run)
        connection.close()
        for h in handles:
            h.cancel()

    return EventStream(events(state, req, rid, encoded, handles, connection), release)


async def complete(state, req, rid, encoded, handles, connection) -> Response:
    async def finished(handle):
        async for _ in handle:
            pass
        return handle.result(0)

    try:
        results = await connection.race(asyncio.gather(*(finished(h) for h in handles)))
    finally:
        connection.close()
        for h in handles:
            h.cancel()  # a no-op for finished requests; frees the slots of a client that went away
    if state.status == "draining" and any(h.first_token_at is None for h in handles):
        raise ClosedError("the server is shutting down before this request started; retry")
    token_text = token_texts(state.model)
    choices = []
    for index, (handle, result) in enumerate(zip(handles, results)):
        echo = state.model.decode(handle.prompt_ids) if req.echo else ""
        call = req.tools.read(result.text) if req.tools else None
        finish = "tool_calls" if call else finish_reason(result.finish_reason)
        choices.append(choice(req, index, echo + result.text, finish, result.logprobs, token_text, tool_call=call))
    body = response_body(req, rid, int(time.time()), state.options.name, choices,
                         usage([len(e) for e in encoded], [r.output_ids for r in results], cached(handles, req.n)))
    return JSONResponse(body)


async def events(state, req, rid, encoded, handles, connection) -> AsyncIterator[str]:
    """The server-sent events of one streamed request: per choice, its opening chunk, then one chunk per token. A
    stream cut by the drain before its first token ends in an error event (its 200 went out when it was queued)."""
    created, name, token_text = int(time.time()), state.options.name, token_texts(state.model)

    def event(choices, usage_=None):
        return chunk_event(req, rid, created, name, choices, usage_)

    try:
        for index, handle in enumerate(handles):
            stream = handle.__aiter__()
            delta = await connection.race(anext(stream, None))
            if index == 0 and delta is not None and delta.token is None and state.status == "draining":
                yield error_event("the server is shutting down and this request had not started; retry", "service_unavailable")
                return
            if req.kind == "chat":
                yield event([role_chunk(index)])
            elif req.echo:
                yield event([choice(req, index, state.model.decode(handle.prompt_ids), None, [], token_text)])
            held = "" if req.tools and req.tools.may_be_call("") else None  # a possible tool call, held back
            held_samples: list = []  # and the log-probabilities of its tokens, sent with the text that releases it
            while delta is not None:
                samples = [delta.sample] if req.logprobs is not None and delta.kept else []
                finish = finish_reason(delta.finish_reason) if delta.finish_reason else None
                if held is not None:
                    held += delta.text
                    held_samples += samples
                    if finish is None and req.tools.may_be_call(held):
                        delta = await connection.race(anext(stream, None))
                        continue
                    call = req.tools.read(held) if finish else None
                    if call:
                        yield event([choice(req, index, "", None, [], token_text, streaming=True, tool_call=call)])
                        finish = "tool_calls"
                    delta, held, samples = dataclasses.replace(delta, text="" if call else held), None, held_samples
                if delta.text or delta.kept or finish:  # one chunk per token, even while its text is held back
                    yield event([choice(req, index, delta.text, finish, samples, token_text, streaming=True)])
                delta = await connection.race(anext(stream, None))
        if req.include_usage:
            yield event([], usage([len(e) for e in encoded], [h.result(0).output_ids for h in handles],
                                  cached(handles, req.n)))
        yield DONE_EVENT
    except ClientGone:
        raise
    except NeodeployError as exc:  # a request that failed mid-stream: say so in the stream, then end it
        yield error_event(str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug: logged with an id, the stream still ends in JSON
        yield error_event(logged_bug(exc))
    # EventStream's release frees the slots, however the stream ends


def cached(handles: list, n: int) -> int:
    """Prompt tokens served from the prefix cache, each prompt counted once (its n choices share it)."""
    return sum(h.cached_tokens for h in handles[::n])


def token_texts(model) -> Callable[[int], str]:
    """How one token id is spelled in logprobs: its text, or the id itself for an artifact without a tokenizer."""
    return (lambda i: model.decode([i])) if model.tokenizer else str


class Connection:
    """Watches one request's connection. Once the body is read, the next ASGI message is `http.disconnect`, so one
    pending `receive()` tells when the client went away, without polling."""

    def __init__(self, receive):
        self._gone = asyncio.ensure_future(self._wait(receive))

    @staticmethod
    async def _wait(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def race(self, awaitable):
        """The awaitable's result, or ClientGone (and the awaitable cancelled) if the client leaves first."""
        work = asyncio.ensure_future(awaitable)
        await asyncio.wait({work, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        raise ClientGone

    def close(self) -> None:
        self._gone.cancel()


class EventStream(StreamingResponse):
    """text/event-stream from an async iterator of events; the iterator itself notices a client that left."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientGone:
            return
        finally:
            self.release()  # the slots of a stream that ended, failed to send, or never started
