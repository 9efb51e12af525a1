"""Speculative decoding at batch 1: a drafter proposes k tokens, the model checks them all in one call.

    model = load("artifact/", speculate="ngram")          # prompt lookup: no second model
    model = load("pythia-1b/", speculate="pythia-70m/")   # a small sibling sharing the tokenizer drafts

Decoding on a CPU is memory-bound: one call that feeds the last token plus k drafted tokens reads the weights once and
returns logits at all k + 1 positions (`DecodeBatch.verify`). The sequence's own sampler then takes those positions in
order, exactly as plain decoding would take them one call at a time, and stops at the first position whose sampled
token is not the drafted one: that token is the correction, the drafted tokens after it are forgotten
(`DecodeBatch.rollback`: an in-place cache just stops reading them).

Why this is exact: every drafter here proposes one token per position with certainty (prompt lookup copies, a draft
model drafts greedily). For a point-mass draft q = δ(d), the standard rejection rule (accept d with probability
min(1, p(d) / q(d)) = p(d), else draw from the residual max(0, p - q) normalised = p without d) yields each token x
with probability p(x) — the same distribution as drawing from p and keeping d only if the draw is d, which is what
`Sequence.feed` does here. So sampling keeps its distribution, and more than that: with the same seed the sampler
consumes the same uniform draws in the same order, so the output is token for token the one plain decoding gives.
Greedy is the special case (the draw is the argmax).

Adaptive, by the clock: a speculative step (drafting included) must yield more tokens per second than a plain step
(the caller reports those: `plain_step`). Where it does not — nothing accepted, or too little for a draft model's
cost — speculation rests for 2, 4, ... 64 plain steps before it tries again, and a try that pays ends the rest. So a
workload the drafter cannot serve pays for at most one losing step in 65.

Batch 1 only: in a batch, rows would accept different numbers of tokens and leave the cache's right-aligned rows
ragged (each row re-aligned per step, GPT-NeoX keys re-rotated), and a batch already shares each weight read among
its rows, which is the saving speculation buys. The engine speculates while one request decodes alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neodeploy.core.errors import UsageError
from neodeploy.runtime.batch import DecodeBatch
from neodeploy.runtime.sequence import Delta, Sequence

NGRAM = "ngram"
MAX_TOKENS = 16
MAX_REST = 64  # plain steps between tries after repeated losing ones (doubling from 2)
SMOOTHING = 0.3  # weight of the newest step in the tokens-per-second averages


class NgramDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n tokens
    (n from `longest` down to `shortest`), searched in the prompt and the output so far. Strong where the output
    quotes its input: code edits, extraction, summaries, chat that repeats the question."""

    def __init__(self, longest: int = 4, shortest: int = 2):
        self.longest, self.shortest = longest, shortest

    def draft(self, context: Seq[int], k: int) -> list[int]:
        tokens = np.asarray(context, dtype=np.int64)
        for n in range(min(self.longest, len(tokens) - 1), self.shortest - 1, -1):
            # Windows that end before the last token, so a match always has a continuation after it.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + k].tolist()
        return []


class ModelDrafter:
    """A small model that shares the target's tokenizer drafts greedily, keeping its own batch-1 cache in step with
    the context (cut back to the part the target kept, then extended by what is new)."""

    def __init__(self, model, vocab: int):
        self.model, self.vocab = model, vocab  # vocab: ids it may propose (both models' real vocabulary)
        self.batch: DecodeBatch | None = None
        self.fed: list[int] = []  # the tokens in the draft's cache, in order

    def draft(self, context: Seq[int], k: int) -> list[int]:
        if len(context) + k > self.model.max_context:
            return []
        logits = self._catch_up(list(context))
        drafted: list[int] = []
        while True:
            token = int(np.argmax(logits[: self.vocab]))
            drafted.append(token)
            if len(drafted) == k:
                return drafted
            logits = self.batch.step(np.array([token], dtype=np.int64))[0]
            self.fed.append(token)

    def _catch_up(self, context: list[int]) -> np.ndarray:
        """Feed the draft what it has not seen of `context`; returns its logits after the last token."""
        common = 0
        for mine, theirs in zip(self.fed, context[:-1]):  # the last token is always fed now: its logits draft
            if mine != theirs:
                break
            common += 1
        if self.batch is None or common == 0:
            self.batch = DecodeBatch(self.model.backend)
            logits = self.batch.prefill([context], self.model.pad_token_id, capacity=len(context) + 2 * MAX_TOKENS)
        else:
            self.batch.rollback(len(self.fed) - common)
            logits = self.batch.extend(context[common:])
        self.fed = context
        return logits[0]


@dataclass
class Acceptance:
    """Drafted and accepted tokens so far (the acceptance rate is their ratio)."""

    drafted: int = 0
    accepted: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Speculator:
    """Runs speculative steps for whichever sequence decodes alone; one per decoding loop (not thread-safe)."""

    def __init__(self, drafter, tokens: int, clock=time.perf_counter):
        self.drafter, self.tokens, self.clock = drafter, tokens, clock
        self.stats = Acceptance()
        self._rest = 0  # plain steps left before the next try
        self._losses = 0  # losing tries in a row
        self._plain: float | None = None  # tokens per second: plain steps, speculative steps (smoothed)
        self._fast: float | None = None

    def plain_step(self, seconds: float) -> None:
        """The caller's plain decoding step of the sequence took `seconds` (one token)."""
        self._plain = _smooth(self._plain, 1.0 / max(seconds, 1e-9))

    def step(self, batch: DecodeBatch, sequence: Sequence) -> tuple[list[Delta], int, int] | None:
        """One speculative step: (the deltas it produced, tokens drafted, tokens accepted), or None when it does not
        speculate now (resting, no draft, or too few tokens left): the caller then steps plainly."""
        room = sequence.params.max_new_tokens - sequence.steps - 1  # the step's own token is the +1
        if self._rest > 0:
            self._rest -= 1
            return None
        if room < 1:
            return None
        start = self.clock()
        draft = self.drafter.draft([*sequence.prompt_ids, *sequence.sampler.outputs], min(self.tokens, room))
        if not draft:
            return None
        logits = batch.verify([sequence.last_token, *draft])
        deltas, accepted = [], 0
        for position, row in enumerate(logits):
            delta = sequence.feed(row)
            deltas.append(delta)
            if delta.finish_reason is not None or position == len(draft) or delta.token != draft[position]:
                break
            accepted += 1
        if delta.finish_reason is None:
            batch.rollback(len(draft) - accepted)  # the cache keeps the last token and the accepted drafts
        self._fast = _smooth(self._fast, len(deltas) / max(self.clock() - start, 1e-9))
        self._adapt()
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        return deltas, len(draft), accepted

    def _adapt(self) -> None:
        if self._plain is None:  # nothing to compare with yet: one plain step measures it
            self._rest = 1
        elif self._fast > self._plain:
            self._losses = 0
        else:
            self._losses += 1
            self._rest = min(MAX_REST, 2**self._losses)


def _smooth(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value


def absolute_draft(draft: str | None) -> str | None:
    """A draft artifact's folder as an absolute path, for a process that starts elsewhere (a Ray replica); "ngram"
    and None as they are."""
    return str(Path(draft).resolve()) if draft and draft != NGRAM else draft


def check_tokens(tokens: int) -> int:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_TOKENS:
        raise UsageError(f"--speculate-tokens must be an integer from 1 to {MAX_TOKENS}, got {tokens!r}")
    return tokens


def check_verifies(model) -> None:
    if not model.backend.verifies:
        raise UsageError(f"{model.artifact} returns last-position logits only (--logits last), so it cannot check drafted "
                         "tokens in one call; speculate with an export made with --target cpu or --logits all")


def shared_vocabulary(target, draft) -> int:
    """Ids a draft may propose: both models' real vocabulary (Pythia sizes pad their embedding rows to different
    counts; ids past the tokenizer's are padding). Refuses a draft whose tokenizer differs from the target's."""
    mine, theirs = target.manifest.files.get("tokenizer.json"), draft.manifest.files.get("tokenizer.json")
    if mine != theirs:
        raise UsageError(f"the draft {draft.artifact} does not share {target.artifact}'s tokenizer; a draft must use "
                         "the same one (every Pythia size shares one; GPT-Neo 125M shares GPT-2's with 1.3B and 2.7B)")
    vocab = min(target.vocab_size, draft.vocab_size)
    return min(vocab, target.tokenizer.vocab_size) if target.tokenizer is not None else vocab
