"""OpenAI request bodies -> typed requests, validated by name. No web framework here: the app adapts these.

A field we do not implement is refused by name (400), never silently ignored: a client that asks for
`logit_bias` or `best_of` must not believe it got them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neodeploy.errors import UsageError
from neodeploy.runtime.sampling import MAX_LOGPROBS, Sample, SamplingParams


class BadRequest(UsageError):
    """A request parameter is wrong: 400 with `param` naming it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


UNSUPPORTED = ("best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix", "tools", "tool_choice",
               "functions", "function_call", "response_format", "parallel_tool_calls", "audio", "modalities",
               "prediction", "reasoning_effort", "service_tier", "store", "metadata", "web_search_options",
               "min_p", "length_penalty")
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
          "top_k", "repetition_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
MAX_N = 16
MAX_STOPS = 4


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list[Any]  # strings or token-id lists (completions); one rendered string (chat)
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    messages: list[dict] | None = None
    max_tokens_given: bool = True


def _number(body: dict, name: str, default: float, low: float, high: float | None = None, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise BadRequest(f"{name} must be a finite number, got {_short(value)}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else f">{'' if low_open else '='} {low:g}"
        raise BadRequest(f"{name} must be in {span}, got {_short(value)}", name)
    return float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float: 1e999 written out
        return False


def _short(value: Any) -> str:
    """A client's value in a message, cut to a readable length (a 10**400 integer is 400 digits)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {_short(value)}", name)
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name} must be {'in ' + str(low) + '..' + str(high) if high is not None else '>= ' + str(low)}, got {_short(value)}", name)
    return value


def _check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in body:
        if name in UNSUPPORTED:
            raise BadRequest(f"{name} is not supported by this server; remove it", name)
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name}", name)
    if not isinstance(body.get("model"), str):
        raise BadRequest("model is required (a string; GET /v1/models lists it)", "model")
    return body


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stops if s)


def _common(body: dict, max_tokens: int | None, logprobs: int | None) -> tuple[SamplingParams, int, bool, bool]:
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options takes only include_usage", "stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options needs stream: true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", "user")
    params = SamplingParams(
        max_new_tokens=max_tokens or 1,  # chat without max_tokens: the app fills in the rest of the context
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
        stop=_stop(body),
        logprobs=logprobs,
    )
    return params, n, stream, include_usage


def parse_completion(body: Any) -> GenerationRequest:
    body = _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise BadRequest("prompt must be a non-empty string, list of strings, list of token ids or list of such lists",
                         "prompt")
    if any(p == "" for p in prompts):
        raise BadRequest("prompt is empty; give at least one token", "prompt")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest("echo must be a boolean", "echo")
    if echo and logprobs is not None:
        raise BadRequest("echo with logprobs (prompt log-probabilities) is not supported; drop one of them", "echo")
    params, n, stream, include_usage = _common(body, _integer(body, "max_tokens", 16, 1), logprobs)
    return GenerationRequest("completion", body["model"], prompts, params, n, stream, include_usage, echo, logprobs)


def parse_chat(body: Any) -> GenerationRequest:
    body = _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string role and a string content", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BadRequest(f"message field {sorted(extra)[0]} is not supported", "messages")
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise BadRequest("logprobs must be a boolean for chat completions", "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, name, None, 1)
    logprobs = (top or 0) if want else None
    params, n, stream, include_usage = _common(body, max_tokens, logprobs)
    return GenerationRequest("chat", body["model"], [], params, n, stream, include_usage, False, logprobs,
                             messages=messages, max_tokens_given=max_tokens is not None)


# ----------------------------------------------------------------------------------------------------- responses
# Pure functions from what the engine produced to OpenAI's JSON shapes. `token_text(id) -> str` spells one token.

TokenText = Callable[[int], str]


def finish_reason(reason: str) -> str:
    """The engine's reason in OpenAI's words: eos and stop strings are both "stop"; "cancelled" stays itself."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def usage(prompt_lengths: list[int], outputs: list[list[int]]) -> dict:
    """Each prompt counted once (n choices share it) and every generated token (a stop token is not output)."""
    prompt, completion = sum(prompt_lengths), sum(len(o) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(samples: list[Sample], token_text: TokenText) -> dict:
    tokens = [token_text(s.token) for s in samples]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in samples],
            "top_logprobs": [{token_text(i): lp for i, lp in s.top} for s in samples], "text_offset": offsets}


def chat_logprobs(samples: list[Sample], token_text: TokenText) -> dict:
    def entry(i: int, lp: float | None) -> dict:
        t = token_text(i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}
                        for s in samples]}


def choice(req: GenerationRequest, index: int, text: str, finish: str | None, samples: list[Sample],
           token_text: TokenText, streaming: bool = False) -> dict:
    """One entry of `choices`: a message (chat), a delta (chat stream) or a text (completions)."""
    if req.kind == "chat":
        if streaming:
            content = {"content": text} if text else {}
        else:
            content = {"role": "assistant", "content": text}
        return {"index": index, ("delta" if streaming else "message"): content, "finish_reason": finish,
                "logprobs": chat_logprobs(samples, token_text) if req.logprobs is not None else None}
    return {"index": index, "text": text, "finish_reason": finish,
            "logprobs": completion_logprobs(samples, token_text) if req.logprobs is not None else None}


def response_body(req: GenerationRequest, rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage_}


def chunk_event(req: GenerationRequest, rid: str, created: int, model: str, choices: list[dict],
                usage_: dict | None = None) -> str:
    """One server-sent event of a stream; `usage` appears on every chunk once asked for (null until the last)."""
    body = {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": choices}
    if req.include_usage:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def role_chunk(index: int) -> dict:
    """A chat stream's first choice delta for each choice: the role, no content yet (as OpenAI sends it)."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


DONE_EVENT = "data: [DONE]\n\n"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_event(message: str, kind: str = "server_error") -> str:
    """A stream that fails after it started says so in the stream (its status line went out with the first token)."""
    return f"data: {json.dumps(error_body(message, kind))}\n\n"
