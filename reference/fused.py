"""The attention core as one custom op, so the CPU export can lower it to onnxruntime's GroupQueryAttention.

The reference itself never takes this path; a model switched to it (`use_fused_attention`) computes the same
numbers in eager mode (this op's implementation is the reference's math with the mask as an additive bias),
and torch.export records one `neodeploy::attention` node per layer instead of ~25 small ops, which
export/attention.py translates to com.microsoft.GroupQueryAttention.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("neodeploy::attention", mutates_args=())
def fused_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, bias: Tensor,
                    num_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, seq, heads * head_dim]; past [batch, heads, past, head_dim]; bias [batch, 1, seq, past + seq]
    (0 where a key is visible, fp32 min elsewhere). Returns (output [batch, seq, hidden], present key, value)."""
    b, s, h = q.shape
    d = h // num_heads

    def heads(x: Tensor) -> Tensor:
        return x.view(b, s, num_heads, d).transpose(1, 2)

    keys = torch.cat([past_k, heads(k)], dim=2)
    values = torch.cat([past_v, heads(v)], dim=2)
    scores = torch.matmul(heads(q).float(), keys.float().transpose(-1, -2)) * scale + bias
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).transpose(1, 2).reshape(b, s, h), keys, values


@fused_attention.register_fake
def _(q, k, v, past_k, past_v, bias, num_heads, scale):
    b, s, _ = q.shape
    present = (b, past_k.shape[1], past_k.shape[2] + s, past_k.shape[3])
    return q.new_empty(q.shape), past_k.new_empty(present), past_v.new_empty(present)


def attention_bias(allowed: Tensor) -> Tensor:
    """The boolean visibility mask as the additive fp32 bias GroupQueryAttention takes."""
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
