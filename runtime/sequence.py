"""One generating sequence: its sampler, its text stream, its budget. `Model` and the engine both drive these,
so a request yields the same tokens, text and finish reason whichever of them runs it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neodeploy.runtime.grammar import Constraint
from neodeploy.runtime.sampling import Sample, Sampler, SamplingParams
from neodeploy.runtime.text import TextStream


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "length" | "eos" | "stop" | "cancelled"
    logprobs: list[Sample] = field(default_factory=list)  # per output token, when asked for


@dataclass(frozen=True)
class Delta:
    """What one step of a sequence produced: the sampled token (also when it was a stop id, which is not part of
    the output), the text it made visible, and the finish reason once the sequence ended."""

    token: int | None
    text: str
    sample: Sample | None = None
    finish_reason: str | None = None
    kept: bool = False  # the token is part of the output (not a stop id)


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, stop_ids, stop_strings, eos_token_id,
                 constraint: Constraint | None = None):
        self.prompt_ids, self.params, self.constraint = prompt_ids, params, constraint
        self.sampler = Sampler(params, prompt_ids)
        self.text = TextStream(tokenizer, stop_ids, stop_strings, eos_token_id)
        self.steps = 0
        self.samples: list[Sample] = []
        self.last_token = prompt_ids[-1]

    @property
    def done(self) -> bool:
        return self.text.done

    def feed(self, logits: np.ndarray) -> Delta:
        """Sample from this sequence's last-position logits [vocab] and account for the token."""
        constraint = self.constraint
        sample = self.sampler(logits, constraint.allowed() if constraint is not None else None)
        if constraint is not None:
            constraint.consume(sample.token)
        self.steps += 1
        self.last_token = sample.token
        kept = len(self.text.output_ids)
        piece = self.text.push(sample.token)
        if len(self.text.output_ids) > kept and self.params.logprobs is not None:
            self.samples.append(sample)
        if not self.text.done and constraint is not None and constraint.finished:
            piece += self.text.finish("stop")  # the grammar is complete and cannot go on
        if not self.text.done and self.steps >= self.params.max_new_tokens:
            piece += self.text.finish("length")
        return Delta(sample.token, piece, sample, self.text.finish_reason, len(self.text.output_ids) > kept)

    def cancel(self, reason: str = "cancelled") -> Delta:
        return Delta(None, self.text.finish(reason), None, self.text.finish_reason)

    def result(self) -> Generation:
        return Generation(self.prompt_ids, list(self.text.output_ids), self.text.text, self.text.finish_reason or "length",
                          list(self.samples))
