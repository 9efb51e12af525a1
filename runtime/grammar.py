"""Constrained decoding: a token mask from llguidance (numpy API, no torch) applied in the one sampler.

    Grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    model.generate("…", response_format={"type": "json_object"})     # or regex / grammar (Lark)

A `Grammar` is the request's constraint as llguidance grammar text (hashable, part of SamplingParams). Each model
owns one `Grammars`: the llguidance tokenizer (built once, ~1 s for a 50k vocabulary) and compiled matchers cached
by grammar text, so a schema is compiled once and every sequence that uses it starts from a copy. A sequence's
`Constraint` computes its mask before each sample and consumes the sampled token after: the output is valid by
construction, unless max_new_tokens cuts it first (finish reason "length"). The end-of-text token is allowed only
where the grammar may end; once the grammar cannot go on, the sequence stops ("stop").
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from neodeploy.core.errors import UsageError
from neodeploy.core.tokenizer import tokenizer_json

CACHE_SIZE = 64  # compiled grammars kept per model (least recently used dropped first)


class GrammarError(UsageError):
    """A response_format or grammar that cannot be used: the reason is llguidance's, or names the field."""

    def __init__(self, message: str, param: str | None = "response_format"):
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the bitmask helpers
    except ImportError as exc:
        raise UsageError("structured output needs llguidance: pip install 'neodeploy[serve]' (or llguidance)") from exc
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """One constraint: `kind` (json_schema, json_object, regex, lark) and llguidance's grammar text."""

    kind: str
    text: str

    @staticmethod
    def json_schema(schema: dict | bool) -> Grammar:
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("json_schema.schema must be a JSON Schema object")
        llg = _llguidance()
        try:
            return Grammar("json_schema", llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}))
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from exc

    @staticmethod
    def json_object() -> Grammar:
        return Grammar.json_schema({"type": "object"})

    @staticmethod
    def regex(pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return Grammar("regex", _llguidance().LLMatcher.grammar_from_regex(pattern))

    @staticmethod
    def lark(source: str) -> Grammar:
        if not isinstance(source, str) or not source.strip():
            raise GrammarError("grammar must be a non-empty Lark grammar string")
        return Grammar("lark", _llguidance().LLMatcher.grammar_from_lark(source))

    @staticmethod
    def from_response_format(value: Any) -> Grammar | None:
        """OpenAI's `response_format` (text, json_object, json_schema) and our extensions (regex, grammar)."""
        if value is None:
            return None
        if isinstance(value, Grammar):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise GrammarError("response_format must be an object with a type (text, json_object, json_schema, regex, "
                               "grammar)")
        kind = value["type"]
        allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"},
                   "regex": {"type", "regex"}, "grammar": {"type", "grammar"}}
        if kind not in allowed:
            raise GrammarError(f"response_format type {kind!r} is not one of {', '.join(allowed)}")
        extra = sorted(set(value) - allowed[kind])
        if extra:
            raise GrammarError(f"response_format of type {kind} takes no field {extra[0]!r}")
        if kind == "text":
            return None
        if kind == "json_object":
            return Grammar.json_object()
        if kind == "regex":
            return Grammar.regex(value.get("regex"))
        if kind == "grammar":
            return Grammar.lark(value.get("grammar"))
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec and "name" not in spec:
            raise GrammarError("json_schema must be an object {name, schema, strict}")
        extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if extra:
            raise GrammarError(f"json_schema takes no field {extra[0]!r}")
        return Grammar.json_schema(spec.get("schema", {}))


class Grammars:
    """One model's llguidance tokenizer and compiled-grammar cache; thread-safe (the server compiles in workers)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        self._hf, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._tokenizer = None
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            if self._hf is None:
                raise UsageError("structured output needs the artifact's tokenizer; this artifact has none")
            llg = _llguidance()
            eos = self.eos_token_id if self.eos_token_id is not None else 0
            self._tokenizer = llg.LLTokenizer(tokenizer_json(self._hf.backend), n_vocab=self.vocab_size, eos_token=eos)
        return self._tokenizer

    def matcher(self, grammar: Grammar):
        """A fresh matcher for one sequence (a copy of the cached, compiled one). Raises GrammarError with
        llguidance's reason if the grammar does not compile."""
        with self._lock:
            tokenizer = self._llg_tokenizer()
            compiled = self._cache.get(grammar.text)
            if compiled is not None:
                self._cache.move_to_end(grammar.text)
        if compiled is None:
            llg = _llguidance()
            compiled = llg.LLMatcher(tokenizer, grammar.text, log_level=0)  # compiles, GIL released
            if compiled.is_error():
                what = {"json_schema": "JSON schema", "regex": "regex", "lark": "grammar"}[grammar.kind]
                raise GrammarError(f"the {what} does not compile: {_one_line(compiled.get_error())}")
            with self._lock:
                self._cache[grammar.text] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return compiled.deep_copy()

    def constraint(self, grammar: Grammar | None) -> Constraint | None:
        return None if grammar is None else Constraint(self.matcher(grammar), self.vocab_size)


def _one_line(error: str) -> str:
    """llguidance's reason without its source excerpt: the first line and any 'error:' line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])


class Constraint:
    """One sequence's matcher and its mask buffer."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.numpy as lln

        self.matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = lln.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> np.ndarray:
        """A bool vector [vocab]: the tokens the grammar allows next (bit i of word i // 32 is token i)."""
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise UsageError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar cannot go on: nothing but the end is allowed."""
        return self.matcher.is_stopped()
