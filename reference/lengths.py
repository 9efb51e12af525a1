"""The attention core in the CUDA target's cache layout, as one custom op (neodeploy::attention_by_lengths).

onnxruntime's CUDA GroupQueryAttention takes no attention_bias: it masks by lengths alone. Each row's keys sit at
cache indices 0 .. length - 1 (rows left-aligned, so the cache index is the position; masks right-padded), a
query sees the keys at or before its own index, and a local layer sees the `window` latest of those. This op is
that kernel's contract in PyTorch, so a model switched to it (`use_fused_attention(..., by_lengths=True)`) computes
in eager mode what the exported GroupQueryAttention computes, and export/attention.py lowers it without a bias:
seqlens_k = ReduceSum(attention_mask) - 1, total_sequence_length = the mask's width, local_window_size = window.

The bias form (reference/attention_op.py, the CPU target) stays the one op for the left-padded layout; `attend` picks
between the two by the mask it is given, so the models have one call site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neodeploy.reference.attention_op import fused_attention
from neodeploy.reference.layers import apply_rotary, merge_heads, split_heads


@dataclass(frozen=True)
class Lengths:
    """The mask as the CUDA kernel takes it: the right-padded attention_mask [batch, total] and the layer's local
    window (0: global)."""

    attention_mask: Tensor
    window: int = 0


@torch.library.custom_op("neodeploy::attention_by_lengths", mutates_args=())
def attention_by_lengths(q: Tensor, k: Tensor | None, v: Tensor | None, past_k: Tensor, past_v: Tensor,
                         attention_mask: Tensor, cos_cache: Tensor | None, sin_cache: Tensor | None, num_heads: int,
                         scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v and the packed form as neodeploy::attention; attention_mask [batch, total] right-padded (row b holds
    lengths[b] = its sum real tokens). The seq new tokens of row b go to cache indices past_b .. past_b + seq - 1,
    past_b = 0 for a prompt (seq == total: every row starts at 0, shorter rows right-padded) and lengths[b] - seq
    after it; they are rotated there (cos_cache / sin_cache), written into the past (present width: max(past width,
    total)) and attend to the keys j <= their index, j < lengths[b], and j > index - window on a local layer.
    Queries past a row's length (prompt padding) see the row's real keys; nobody reads them."""
    if k is None:
        q, k, v = q.chunk(3, dim=-1)
    b, s = q.shape[0], q.shape[1]
    total = attention_mask.shape[1]
    lengths = attention_mask.sum(1)
    past = torch.zeros_like(lengths) if s == total else lengths - s
    index = past[:, None] + torch.arange(s)  # [batch, seq] cache index (= position) of each new token
    q, k, v = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    if cos_cache is not None:
        cos = torch.cat([cos_cache[index]] * 2, dim=-1)[:, None]
        sin = torch.cat([sin_cache[index]] * 2, dim=-1)[:, None]
        q, k = apply_rotary(q, cos, sin, cos.shape[-1]), apply_rotary(k, cos, sin, cos.shape[-1])
    width = max(past_k.shape[2], total)
    keys, values = past_k.new_zeros(b, num_heads, width, k.shape[-1]), past_v.new_zeros(b, num_heads, width, v.shape[-1])
    keys[:, :, : past_k.shape[2]], values[:, :, : past_v.shape[2]] = past_k, past_v
    at = index[:, None, :, None].expand(b, num_heads, s, k.shape[-1])
    keys, values = keys.scatter(2, at, k), values.scatter(2, at, v)
    key_index = torch.arange(width)[None, None, :]  # [1, 1, width]
    query_index = torch.minimum(index, lengths[:, None] - 1)[:, :, None]  # [batch, seq, 1]
    allowed = (key_index <= query_index) & (key_index < lengths[:, None, None])
    if window:
        allowed = allowed & (key_index > query_index - window)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = torch.where(allowed[:, None], scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return merge_heads(torch.matmul(probs, values)), keys, values


@attention_by_lengths.register_fake
def _(q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads, scale, window):
    b, s, _ = q.shape
    # The exported graph's present is the kernel's: the mask's width when past holds the previous tokens exactly
    # (an in-place pool bound as both past and present keeps its own width).
    present = (b, past_k.shape[1], attention_mask.shape[1], past_k.shape[3])
    hidden = past_k.shape[1] * past_k.shape[3]
    return q.new_empty((b, s, hidden)), past_k.new_empty(present), past_v.new_empty(present)


def attend(q, k, v, past_k, past_v, mask, cos_cache, sin_cache, num_heads: int, scale: float):
    """The fused attention core for either layout: `mask` is the additive bias (neodeploy::attention, left-padded
    rows) or Lengths (neodeploy::attention_by_lengths, left-aligned rows)."""
    if isinstance(mask, Lengths):
        return attention_by_lengths(q, k, v, past_k, past_v, mask.attention_mask, cos_cache, sin_cache, num_heads,
                                    scale, mask.window)
    return fused_attention(q, k, v, past_k, past_v, mask, cos_cache, sin_cache, num_heads, scale)
