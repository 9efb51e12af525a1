"""One text stream per sequence: incremental decoding, stop ids and strings, UTF-8 and stop hold-back.

Decoding re-reads only a short window of recent tokens (the offsets trick Text Generation Inference and vLLM
use), so a long output costs linear, not quadratic, time. The text a stream releases, joined, equals the text
`Model.generate` returns: cut before the first stop string, never half a UTF-8 character, never a piece that
could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable

from neodeploy.core.errors import UsageError

REPLACEMENT = "\ufffd"


def stop_sets(stop: Iterable[str | int], tokenizer, eos_token_id: int | None) -> tuple[frozenset[int], tuple[str, ...]]:
    """(stop ids, stop strings). A stop string that is one special token never shows in the decoded text
    (specials are skipped), so it stops on that token's id instead."""
    stop = list(stop)
    ids = {int(s) for s in stop if not isinstance(s, str)}
    strings = [s for s in stop if isinstance(s, str) and s]
    if tokenizer is not None:
        special = {s: tokenizer.token_to_id(s) for s in strings}
        ids |= {i for i in special.values() if i is not None}
        strings = [s for s in strings if special[s] is None]
    if strings and tokenizer is None:
        raise UsageError("stop strings need a tokenizer; this artifact has none, pass stop token ids")
    if eos_token_id is not None:
        ids.add(eos_token_id)
    return frozenset(ids), tuple(dict.fromkeys(strings))


class TextStream:
    """Feed it a sequence's tokens one at a time; it says what text may be shown and when the sequence ends.

    finish_reason: None while running, then "eos" (the eos id), "stop" (a stop id or string) or "length"."""

    def __init__(self, tokenizer, stop_ids: frozenset[int], stop_strings: tuple[str, ...], eos_token_id: int | None):
        self.tokenizer, self.stop_ids, self.stop_strings, self.eos = tokenizer, stop_ids, stop_strings, eos_token_id
        self.output_ids: list[int] = []
        self.text = ""  # decoded so far (complete characters), not yet cut at a stop string
        self.sent = 0  # characters of self.text released
        self.finish_reason: str | None = None
        self._prefix = self._read = 0  # token offsets of the decode window
        self._longest_stop = max((len(s) for s in stop_strings), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def push(self, token: int) -> str:
        """Take the next token; returns the text it makes visible (possibly '')."""
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "eos" if token == self.eos else "stop"
            return self._release(len(self.text))
        self.output_ids.append(token)
        if self.tokenizer is None:
            return ""
        before = self._decode(self.output_ids[self._prefix : self._read])
        after = self._decode(self.output_ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new, or an incomplete UTF-8 sequence so far: wait for its other bytes
        searched = max(0, len(self.text) - self._longest_stop + 1)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.output_ids)
        if self.stop_strings:
            window = self.text[searched:]
            hits = [window.find(s) for s in self.stop_strings]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.text = self.text[: searched + min(hits)]
                self.finish_reason = "stop"
                return self._release(len(self.text))
        # Hold back the longest tail that could still grow into any stop string.
        hold = max((k for s in self.stop_strings for k in range(1, min(len(s) - 1, len(self.text)) + 1)
                    if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def finish(self, reason: str = "length") -> str:
        """The sequence ends without a stop (length, cancel): release everything held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            tail = self._decode(self.output_ids[self._prefix :])
            before = self._decode(self.output_ids[self._prefix : self._read])
            if len(tail) > len(before):  # bytes of a character that never completed
                self.text += tail[len(before) :]
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
