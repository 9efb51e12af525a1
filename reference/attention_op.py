"""The attention core as one custom op, so the CPU export can lower it to onnxruntime's GroupQueryAttention.

The reference itself never takes this path; a model switched to it (`use_fused_attention`) computes the same
numbers in eager mode (this op's implementation is the reference's math with the mask as an additive bias),
and torch.export records one `neodeploy::attention` node per layer instead of ~25 small ops, which
export/attention.py translates to com.microsoft.GroupQueryAttention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neodeploy.reference.layers import apply_rotary, merge_heads, split_heads


@torch.library.custom_op("neodeploy::attention", mutates_args=())
def fused_attention(q: Tensor, k: Tensor | None, v: Tensor | None, past_k: Tensor, past_v: Tensor, bias: Tensor,
                    cos_cache: Tensor | None, sin_cache: Tensor | None, num_heads: int,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, seq, heads * head_dim], or k and v None and q the packed [q | k | v] [batch, seq, 3 * hidden]
    (one projection feeds the kernel: no split, no reshape per layer); past [batch, heads, past, head_dim]; bias
    [batch, 1, seq, past + seq] (0 where a key is visible, fp32 min elsewhere). Returns (output [batch, seq, hidden],
    present key, value).

    With cos_cache / sin_cache [positions, rotary_dims / 2], q and k are first rotated (rotate_half, on the first
    rotary_dims of each head) at their cache index past + i, as GroupQueryAttention does. For a left-padded row
    that index is the real position plus the row's padding: every query and key of the row moves by the same
    offset, and rotary attention depends only on the distance between them, so the result is the same."""
    if k is None:
        q, k, v = q.chunk(3, dim=-1)
    s, past = q.shape[1], past_k.shape[2]
    q, k = split_heads(q, num_heads), split_heads(k, num_heads)
    if cos_cache is not None:
        cos = torch.cat([cos_cache[past : past + s]] * 2, dim=-1)
        sin = torch.cat([sin_cache[past : past + s]] * 2, dim=-1)
        q, k = apply_rotary(q, cos, sin, cos.shape[-1]), apply_rotary(k, cos, sin, cos.shape[-1])
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, split_heads(v, num_heads)], dim=2)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale + bias
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return merge_heads(torch.matmul(probs, values)), keys, values


@fused_attention.register_fake
def _(q, k, v, past_k, past_v, bias, cos_cache, sin_cache, num_heads, scale):
    b, s, _ = q.shape
    present = (b, past_k.shape[1], past_k.shape[2] + s, past_k.shape[3])
    hidden = past_k.shape[1] * past_k.shape[3]
    return q.new_empty((b, s, hidden)), past_k.new_empty(present), past_v.new_empty(present)


def packed_rows(num_heads: int, head_dim: int) -> Tensor:
    """GPT-NeoX's query_key_value rows are [head][q, k, v][dim]; the packed op takes [q, k, v][head][dim]: the
    output rows of the fused projection, reordered."""
    rows = torch.arange(3 * num_heads * head_dim).view(num_heads, 3, head_dim)
    return rows.transpose(0, 1).reshape(-1)


def attention_bias(allowed: Tensor) -> Tensor:
    """The boolean visibility mask as the additive fp32 bias GroupQueryAttention takes."""
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
