"""OpenAI request bodies -> typed requests, validated by name. No web framework here: the app adapts these.

A field we do not implement is refused by name (400), never silently ignored: a client that asks for
`best_of: 3` or `store: true` must not believe it got them. Its neutral value (what clients send by default) is
accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

from neodeploy.core.errors import UsageError
from neodeploy.runtime.sampling import MAX_LOGPROBS, Sample, SamplingParams

if TYPE_CHECKING:
    from neodeploy.serve.tools import ToolChoice


class BadRequest(UsageError):
    """A request parameter is wrong: 400 with `param` naming it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# Fields accepted only at a neutral value (what clients send when they mean "not asked for"): any other value is
# refused by name, never ignored. parallel_tool_calls is neutral either way: a response holds at most one call.
NEUTRAL: dict[str, tuple] = {
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,), "functions": (None, []), "function_call": (None,),
    "length_penalty": (None, 1), "parallel_tool_calls": (None, True, False),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
          "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "min_p",
          "response_format", *NEUTRAL}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice"}
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
    tools: ToolChoice | None = None  # chat with tools (serve/tools.py): the call's grammar and how to read it


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
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name}", name)
        if name in NEUTRAL and not any(body[name] == v and type(body[name]) is type(v) for v in NEUTRAL[name]):
            raise BadRequest(f"{name}={_short(body[name])} is not supported by this server; remove it (or send "
                             f"{json.dumps(NEUTRAL[name][-1])})", name)
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
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body),
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
        stop=_stop(body),
        logprobs=logprobs,
        response_format=_response_format(body),
    )
    return params, n, stream, include_usage


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must be an object of token id -> bias in [-100, 100]", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) < 10):
            raise BadRequest(f"logit_bias keys must be token ids, got {_short(key)}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias for token {key} must be a number in [-100, 100], got {_short(value)}",
                             "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _response_format(body: dict):
    """The constraint as a Grammar (compiled later, in a worker thread), or None for text."""
    value = body.get("response_format")
    if value is None:
        return None
    from neodeploy.runtime.grammar import Grammar, GrammarError

    try:
        return Grammar.from_response_format(value)
    except GrammarError as exc:
        raise BadRequest(str(exc), "response_format") from exc
    except UsageError as exc:  # llguidance is missing: the serve extra was not installed whole
        raise BadRequest(str(exc), "response_format") from exc


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
    best_of = _integer(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise BadRequest(f"best_of={best_of} (choosing the best of several) is not supported; send best_of equal to n "
                         f"({n}) or leave it out", "best_of")
    return GenerationRequest("completion", body["model"], prompts, params, n, stream, include_usage, echo, logprobs)


def parse_chat(body: Any) -> GenerationRequest:
    body = _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    messages = [_message(m, i) for i, m in enumerate(messages)]
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
    from neodeploy.serve.tools import parse_tools

    tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    if tools is not None and tools.grammar is not None:
        if params.response_format is not None:
            raise BadRequest("give response_format or tools with a tool_choice that calls them, not both", "tools")
        params = dataclasses.replace(params, response_format=tools.grammar)
    return GenerationRequest("chat", body["model"], [], params, n, stream, include_usage, False, logprobs,
                             messages=messages, max_tokens_given=max_tokens is not None, tools=tools)


ROLES = ("system", "developer", "user", "assistant", "tool")


def _message(m: Any, index: int) -> dict:
    """One chat message as the template sees it: content parts joined into a string (text parts only), an
    assistant's tool_calls and a tool result's tool_call_id kept for the template."""
    where = f"messages[{index}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise BadRequest(f"{where} needs a role ({', '.join(ROLES)})", "messages")
    extra = sorted(set(m) - {"role", "content", "name", "tool_calls", "tool_call_id"})
    if extra:
        raise BadRequest(f"{where}: field {extra[0]} is not supported", "messages")
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{where}: content part of type {kind!r} is not supported (text parts only)",
                                 "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
        raise BadRequest(f"{where} needs content (a string or a list of text parts)", "messages")
    elif content is not None and not isinstance(content, str):
        raise BadRequest(f"{where}: content must be a string or a list of text parts", "messages")
    out = {"role": m["role"], "content": content}
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise BadRequest(f"{where}: name must be a string", "messages")
        out["name"] = m["name"]
    if m.get("tool_calls") is not None:
        from neodeploy.serve.tools import parse_message_tool_calls

        out["tool_calls"] = parse_message_tool_calls(m["tool_calls"], where)
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise BadRequest(f"{where}: a tool message needs the tool_call_id it answers", "messages")
        out["tool_call_id"] = m["tool_call_id"]
    return out


# ----------------------------------------------------------------------------------------------------- responses
# Pure functions from what the engine produced to OpenAI's JSON shapes. `token_text(id) -> str` spells one token.

TokenText = Callable[[int], str]


def finish_reason(reason: str) -> str:
    """The engine's reason in OpenAI's words: eos and stop strings are both "stop"; "cancelled" stays itself."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def usage(prompt_lengths: list[int], outputs: list[list[int]], cached_tokens: int = 0) -> dict:
    """Each prompt counted once (n choices share it) and every generated token (a stop token is not output);
    `prompt_tokens_details.cached_tokens`: prompt tokens whose KV came from the prefix cache, as OpenAI reports it."""
    prompt, completion = sum(prompt_lengths), sum(len(o) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
           token_text: TokenText, streaming: bool = False, tool_call: dict | None = None) -> dict:
    """One entry of `choices`: a message (chat), a delta (chat stream) or a text (completions). With a tool call,
    the message has no content and the call in `tool_calls` (a stream's delta carries it whole, at index 0)."""
    if req.kind == "chat":
        if tool_call is not None:
            calls = [{"index": 0, **tool_call}] if streaming else [tool_call]
            content = {"tool_calls": calls} if streaming else {"role": "assistant", "content": None, "tool_calls": calls}
        elif streaming:
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


# ----------------------------------------------------------------------------------------------------- tokenizer

TOKENIZE_FIELDS = {"model", "prompt", "messages"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def parse_tokenize(body: Any) -> GenerationRequest:
    """vLLM's /tokenize: {"model", "prompt"} or {"model", "messages"} (rendered with the chat template)."""
    body = _check_fields(body, TOKENIZE_FIELDS)
    if ("prompt" in body) == ("messages" in body):
        raise BadRequest("give prompt (a string) or messages, one of them", "prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str) or not body["prompt"]:
            raise BadRequest("prompt must be a non-empty string", "prompt")
        return GenerationRequest("completion", body["model"], [body["prompt"]], SamplingParams(), 1, False, False,
                                 False, None)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    return GenerationRequest("chat", body["model"], [], SamplingParams(), 1, False, False, False, None,
                             messages=[_message(m, i) for i, m in enumerate(messages)])


def parse_detokenize(body: Any) -> tuple[str, list[int]]:
    body = _check_fields(body, DETOKENIZE_FIELDS)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise BadRequest("tokens must be a list of token ids", "tokens")
    return body["model"], tokens
