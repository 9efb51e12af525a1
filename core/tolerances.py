"""The one tolerance table: how far an export, an engine or a deployment may drift from the fp32 reference, per
precision. export's verification gates on `max_rel_error` (and writes it into golden.npz, which `check` replays);
validate gates on all three.

max_rel_error: max |Δlogit| over the logit scale (max |reference logit|) at a step or in a case.
top1_agreement: the share of steps whose top-1 token agrees with the reference's (validate).
ppl_ratio: how far perplexity over the reference's may be from 1 (validate).

Quantised weights move logits by design: their bounds only catch a broken graph, and their accuracy is judged by
validate on trained models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    max_rel_error: float
    top1_agreement: float
    ppl_ratio: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_error=1e-3, top1_agreement=0.99, ppl_ratio=1e-3),
    "fp16": Tolerance(max_rel_error=3e-2, top1_agreement=0.95, ppl_ratio=2e-2),
    "int8": Tolerance(max_rel_error=0.15, top1_agreement=0.90, ppl_ratio=0.05),
    "int4": Tolerance(max_rel_error=0.30, top1_agreement=0.80, ppl_ratio=0.15),
}
