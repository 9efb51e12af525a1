"""Tool calls by constrained decoding: the request's `tools` and `tool_choice` -> a grammar, and the output -> calls.

- `tool_choice: "none"` (or no tools): plain text; the tools are not shown to the model.
- `"required"`, or a named function: the whole output is one call, `{"name": …, "arguments": {…}}`, constrained
  to one of the given functions with arguments that match its `parameters` schema.
- `"auto"` (OpenAI's default when tools are given): the output is either text or one call written
  `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (the Hermes / Qwen convention most open chat templates
  use). The grammar makes the first character decide: text may not begin with "<", so an answer that begins
  with "<tool_call>" is a call and the grammar holds its JSON to a function's schema; anything else is text.
  The tools reach the model through the chat template when it takes `tools`; otherwise a system message lists
  them and says how to call one.

A response holds at most one call (`parallel_tool_calls` is accepted either way).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from neodeploy.runtime.grammar import Grammar, GrammarError
from neodeploy.serve.protocol import BadRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolChoice:
    tools: tuple[Tool, ...]
    mode: str  # "none" | "auto" | "required" (a named function is "required" over that one tool)
    grammar: Grammar | None

    @property
    def offered(self) -> list[dict] | None:
        """The tools as the chat template takes them (None: not shown to the model)."""
        return None if self.mode == "none" else [t.as_openai() for t in self.tools]

    def read(self, text: str) -> dict | None:
        """The call in an output, as OpenAI's `tool_calls[0]`, or None when the output is text (or was cut). In auto
        mode only an output that begins with the marker itself is a call (the grammar constrains exactly those;
        text that begins with a space is free, so a marker after it is text), and only a call to an offered tool."""
        body = text
        if self.mode == "auto":
            if not (body.startswith(CALL_OPEN) and body.rstrip().endswith(CALL_CLOSE)):
                return None
            body = body.rstrip()[len(CALL_OPEN):-len(CALL_CLOSE)]
        elif self.mode != "required":
            return None
        try:
            call = json.loads(body)
        except ValueError:
            return None  # cut by max_tokens: the text is returned as it is, finish_reason "length"
        if not isinstance(call, dict) or call.get("name") not in {t.name for t in self.tools}:
            return None
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}),
                                                                           ensure_ascii=False)}}

    def may_be_call(self, text: str) -> bool:
        """While streaming: could this beginning of an output still turn into a call (hold it back)?"""
        if self.mode == "required":
            return True
        if self.mode != "auto":
            return False
        return text.startswith(CALL_OPEN) or CALL_OPEN.startswith(text)

    def system_note(self) -> str:
        """For a chat template that does not take `tools`: how the model learns of them."""
        return ("You can call one of these functions. To call one, reply with only "
                f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CALL_CLOSE}.\n'
                + "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in self.tools))


def _tool(spec: Any, index: int) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
        raise BadRequest(f"{where} must be {{\"type\": \"function\", \"function\": {{name, description, parameters}}}}",
                         "tools")
    fn = spec["function"]
    extra = sorted(set(spec) - {"type", "function"}) or sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if extra:
        raise BadRequest(f"{where}: field {extra[0]} is not supported", "tools")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRequest(f"{where}.function needs a name", "tools")
    parameters = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}.function.parameters must be a JSON Schema object", "tools")
    return Tool(fn["name"], fn.get("description") or "", parameters)


def _call_schema(tools: tuple[Tool, ...]) -> dict:
    """One call to one of the tools: {"name": const, "arguments": its parameters}. Each tool's `$defs` move to the
    root under a prefix of their own (pydantic nests models there), with its `$ref`s rewritten to match."""
    calls, defs = [], {}
    for i, t in enumerate(tools):
        parameters = dict(t.parameters)
        own = parameters.pop("$defs", None) or parameters.pop("definitions", None) or {}
        rename = {f"#/$defs/{k}": f"#/$defs/t{i}_{k}" for k in own} | {f"#/definitions/{k}": f"#/$defs/t{i}_{k}"
                                                                      for k in own}
        defs.update({f"t{i}_{k}": _rewrite_refs(v, rename) for k, v in own.items()})
        calls.append({"type": "object", "properties": {"name": {"const": t.name},
                                                       "arguments": _rewrite_refs(parameters, rename)},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs} if defs else schema


def _rewrite_refs(node: Any, rename: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (rename.get(v, v) if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, rename))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, rename) for v in node]
    return node


def parse_tools(tools: Any, tool_choice: Any) -> ToolChoice | None:
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of functions", "tools")
    parsed = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise BadRequest("tools have a repeated function name", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise BadRequest(f"tool_choice names a function that is not among the tools: {name!r}", "tool_choice")
        parsed, choice = tuple(t for t in parsed if t.name == name), "required"
    if choice not in ("none", "auto", "required"):
        raise BadRequest("tool_choice must be none, auto, required or {type: function, function: {name}}",
                         "tool_choice")
    try:
        if choice == "required":
            grammar = Grammar.json_schema(_call_schema(parsed))
        elif choice == "auto":
            lark = (f'start: TEXT | "{CALL_OPEN}" call "{CALL_CLOSE}"\n'
                    f"call: %json {json.dumps(_call_schema(parsed))}\n"
                    "TEXT: /[^<](.|\\n)*/\n")
            grammar = Grammar.lark(lark)
        else:
            grammar = None
    except GrammarError as exc:
        raise BadRequest(f"the tools' parameters cannot be used: {exc}", "tools") from exc
    return ToolChoice(parsed, choice, grammar)


def parse_message_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's earlier calls, for the chat template: arguments as an object where they parse."""
    if not isinstance(calls, list):
        raise BadRequest(f"{where}: tool_calls must be a list", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{where}: each tool call needs function.name and function.arguments", "messages")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # kept as the client sent it
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out
