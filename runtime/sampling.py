"""One sampler per sequence: its own parameters, its own RNG, log-probabilities on request.

A seeded sequence draws the same tokens whatever shares its batch (the RNG is the sequence's, not the
batch's), so `Model.generate`, the engine and the server all sample a request exactly as it would be
sampled alone.

The per-token work stays off the vocabulary where it can: greedy is one argmax on the float32 row, top-p never
argsorts the row (argsorting 50k probabilities took 4.7 ms a token, longer than a pythia-160m int4 decode step),
and the draw walks only the tokens left in. `sampling_distribution` is the
whole-vocabulary statement of the same filtering; a test holds the two to the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neodeploy.core.errors import ModelOutputError, UsageError
from neodeploy.runtime.grammar import Grammar

MAX_LOGPROBS = 20  # OpenAI's own limit on top log-probabilities per token


@dataclass(frozen=True)
class SamplingParams:
    """Everything one generation takes. `stop` holds strings and token ids; `logprobs` the number of top
    log-probabilities to report per generated token (None: none, 0: the sampled token's only)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str | int, ...] = field(default=())
    logprobs: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus count x this, over the tokens generated so far
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); a dict is accepted
    min_p: float = 0.0  # drop tokens below min_p x the likeliest one's probability (after temperature)
    response_format: Grammar | None = None  # a constraint; an OpenAI response_format dict is accepted

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, (str, int, np.integer)):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(int(s) if isinstance(s, np.integer) else s for s in (stop or ())))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "response_format", Grammar.from_response_format(self.response_format))
        self.check()

    @property
    def adjusts_logits(self) -> bool:
        """Anything besides temperature and the filters touches the logits (the greedy path then copies them)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or bool(self.logit_bias))

    def check(self) -> None:
        def number(value) -> bool:
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                return False
            try:
                return math.isfinite(value)
            except OverflowError:  # an integer too large for a float (10**400) is no usable value either
                return False

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not number(self.temperature) or not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UsageError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if not number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise UsageError(f"{name} must be in [-2, 2] (0 disables it), got {getattr(self, name)!r}")
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise UsageError(f"logit_bias for token {token} must be in [-100, 100], got {bias!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise UsageError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        for s in self.stop:
            if not isinstance(s, (str, int)) or isinstance(s, bool):
                raise UsageError(f"stop entries must be strings or token ids, got {s!r}")
            if s == "":
                raise UsageError("an empty stop string would stop before any text; remove it")


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (id, bias) pairs from a dict ({"50256": -100} as OpenAI sends it) or pairs."""
    items = bias.items() if isinstance(bias, dict) else (bias or ())
    pairs = {}
    for token, value in items:
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise UsageError(f"logit_bias keys must be token ids, got {token!r}") from None
        if isinstance(token, bool) or isinstance(token, float) or str(token_id) != str(token).strip() or token_id < 0:
            raise UsageError(f"logit_bias keys must be token ids, got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
            raise UsageError(f"logit_bias for token {token_id} must be a number in [-100, 100], got {value!r}")
        pairs[token_id] = float(value)
    return tuple(sorted(pairs.items()))


def adjusted(logits: np.ndarray, history: list[int], outputs: list[int], params: SamplingParams,
             allowed: np.ndarray | None = None) -> np.ndarray:
    """One row's logits [vocab] as float64 after, in order: transformers' repetition penalty (over prompt and
    output), OpenAI's frequency and presence penalties (over the output), logit_bias, and the grammar's mask
    (disallowed tokens -inf). The one statement of these rules: the sampler and sampling_distribution use it."""
    row = penalised(logits[None, :], [history], params.repetition_penalty)[0]
    if (params.frequency_penalty or params.presence_penalty) and outputs:
        ids, counts = np.unique(np.asarray(outputs, dtype=np.int64), return_counts=True)
        row[ids] -= counts * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        row[ids] += np.array([b for _, b in params.logit_bias])
    if allowed is not None:
        np.copyto(row, -np.inf, where=~allowed)
    return row


def penalised(logits: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    """transformers' repetition penalty: seen tokens' positive logits divided by it, negative ones multiplied."""
    logits = logits.astype(np.float64, copy=True)
    if penalty != 1.0:
        for row, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            values = logits[row, ids]
            with np.errstate(over="ignore"):
                scaled = np.where(values > 0, values / penalty, values * penalty)
            # A penalty near 0 or huge overflows a finite logit (30 / 5e-324): saturate it, as the limit it means;
            # a logit that was not finite stays as it was, for the model-output check to see.
            limit = np.finfo(np.float64).max
            logits[row, ids] = np.where(np.isfinite(values), np.clip(scaled, -limit, limit), values)
    return logits


def sampling_distribution(logits: np.ndarray, history: list[list[int]], params: SamplingParams,
                          outputs: list[list[int]] | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
    """Probabilities [batch, vocab] after the adjustments (penalties, logit_bias, a grammar's `allowed` [batch,
    vocab]), temperature, min-p, top-k and top-p (temperature > 0). `outputs`: each row's generated tokens."""
    logits = np.stack([adjusted(row, seen, (outputs or [[]] * len(history))[i], params,
                                None if allowed is None else allowed[i])
                       for i, (row, seen) in enumerate(zip(logits, history))])
    # The max first: a temperature near the float minimum turns x / T into inf, and inf - inf into NaN.
    logits = (logits - logits.max(-1, keepdims=True)) / params.temperature
    if params.min_p > 0:  # after the max came off, log p_i - log p_max is the scaled logit itself
        logits = np.where(logits < math.log(params.min_p), -np.inf, logits)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = np.partition(logits, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of every value >= the k-th largest, in index order: a superset of the k largest that is closed
    under ties, so a stable sort of it is exactly the first entries of a stable sort of the whole row."""
    if k >= values.shape[-1]:
        return np.arange(values.shape[-1])
    kth = np.partition(values, values.shape[-1] - k)[values.shape[-1] - k]
    return np.flatnonzero(values >= kth)


def _descending(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return candidates[np.argsort(-values[candidates], kind="stable")]


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens top-p keeps (the smallest most-likely prefix whose mass reaches top_p), as sampling_distribution
    keeps them, in index order. A peaked row's nucleus is found among a few hundred candidates; a wide one (a flat
    row, a high temperature) from the sorted values alone: their running sum is the stable order's (ties are equal
    values), and the kept set is every value above the last one kept plus, of the values equal to it, the first
    ones by index, which is what the stable order keeps. No argsort of the vocabulary (3.6 ms for 50k)."""
    order = _descending(probs, _largest(probs, 256))
    ranked = probs[order]
    kept = int(np.count_nonzero(np.cumsum(ranked) - ranked < top_p))
    if kept < order.shape[0] or order.shape[0] == probs.shape[0]:
        return np.sort(order[:kept])
    ranked = np.sort(probs)[::-1]
    kept = int(np.count_nonzero(np.cumsum(ranked) - ranked < top_p))
    edge = ranked[kept - 1]
    keep = probs > edge
    keep[np.flatnonzero(probs == edge)[: kept - int(np.count_nonzero(keep))]] = True
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None = None  # log p(token) under the model's own distribution (before any filtering)
    top: tuple[tuple[int, float], ...] = ()  # the `logprobs` most likely (id, logprob), best first


class Sampler:
    """Picks one sequence's tokens. The history (prompt + output) feeds the repetition penalty."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.history = [list(prompt_ids)]
        self.prompt_length = len(prompt_ids)

    @property
    def outputs(self) -> list[int]:
        return self.history[0][self.prompt_length:]

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> Sample:
        """logits [vocab] at the sequence's last position; `allowed` [vocab] bool: a grammar's mask."""
        params = self.params
        if params.temperature == 0:
            if params.adjusts_logits or allowed is not None:
                _finite(logits.max())  # NaN propagates into the max; +inf is the max
                row = adjusted(logits, self.history[0], self.outputs, params, allowed)
                token = int(row.argmax())
                _allowed_any(row[token])
            else:
                token = int(logits.argmax())
                _finite(logits[token])  # argmax lands on a NaN or an inf if the row has one
        else:
            token = self._draw(logits, allowed)
        self.history[0].append(token)
        if params.logprobs is None:
            return Sample(token)
        shifted = logits.astype(np.float64) - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        k = params.logprobs
        top = _descending(logp, _largest(logp, k))[:k] if k else []
        # A -inf logit (a masked token) has no JSON number: it is not among the likeliest anyway.
        return Sample(token, float(logp[token]), tuple((int(i), float(logp[i])) for i in top if np.isfinite(logp[i])))

    def _draw(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """What rng.choice(vocab, p=sampling_distribution(...)) draws (the same single uniform, searched in the
        same cumulative sums up to rounding), over the tokens left in only."""
        params = self.params
        if params.adjusts_logits or allowed is not None:
            _finite(logits.max())  # the model's own row: NaN propagates into the max, +inf is the max
            scaled = adjusted(logits, self.history[0], self.outputs, params, allowed)  # a float64 copy: ours
            top = scaled.max()
            _allowed_any(top)
        else:
            scaled = logits.astype(np.float64)
            top = scaled.max()
            _finite(top)  # NaN propagates into the max, and an inf or an all -inf row is the max
        scaled -= top  # before the temperature, as in sampling_distribution: x / 1e-310 overflows
        scaled /= params.temperature
        kept = None
        if params.min_p > 0:
            kept = np.flatnonzero(scaled >= math.log(params.min_p))  # p_i >= min_p x p_max, the max being 0 here
            scaled = scaled[kept]
        if params.top_k and params.top_k < scaled.shape[0]:
            top_k = _largest(scaled, params.top_k)  # ties at the k-th value stay in, as in sampling_distribution
            scaled = scaled[top_k]
            kept = top_k if kept is None else kept[top_k]
        scaled -= scaled.max()
        probs = np.exp(scaled, out=scaled)
        probs /= probs.sum()
        if params.top_p < 1.0:
            nucleus = _nucleus(probs, params.top_p)
            probs = probs[nucleus]
            probs /= probs.sum()
            kept = nucleus if kept is None else kept[nucleus]
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        index = int(np.searchsorted(cdf, self.rng.random(), side="right"))
        return int(index if kept is None else kept[index])


def _allowed_any(value: float) -> None:
    if value == -np.inf:
        raise UsageError("no token is left to sample: the grammar and logit_bias together exclude every token")


def _finite(value: float) -> None:
    if not np.isfinite(value):
        raise ModelOutputError(f"the model's logits are not finite ({float(value)}): the artifact is broken or its "
                               "precision overflowed; run `neodeploy check` on it (an fp16 export: try fp32)")
