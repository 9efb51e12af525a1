"""Greedy decoding with the reference model through its KV cache: the offline demo and a test oracle."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from neodeploy.core.errors import UsageError


@dataclass
class ReferenceGeneration:
    prompt_ids: list[int]
    output_ids: list[int]
    prefill_s: float
    decode_s: float
    # With keep_logits: the last-position logits [len(output_ids), vocab] each output token was chosen from.
    step_logits: list | None = None


@torch.inference_mode()
def greedy_generate(
    model: nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None,
    keep_logits: bool = False,
) -> ReferenceGeneration:
    spec = model.spec
    if not prompt_ids:
        raise UsageError("the prompt is empty; give at least one token")
    if len(prompt_ids) + max_new_tokens > spec.max_positions:
        raise UsageError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"{spec.max_positions} positions; shorten the prompt or ask for fewer tokens"
        )
    bad = [t for t in prompt_ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    start = time.perf_counter()
    logits, past = model(ids)
    prefill_s = time.perf_counter() - start
    out: list[int] = []
    kept = [] if keep_logits else None
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if kept is not None:
            kept.append(logits[0, -1].numpy())
        if token == eos_token_id or len(out) == max_new_tokens:
            break
        logits, past = model(torch.tensor([[token]]), past_key_values=past)
    return ReferenceGeneration(list(prompt_ids), out, prefill_s, time.perf_counter() - start, kept)
