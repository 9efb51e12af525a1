"""The few pieces both architectures share: activations, masks, default positions.

Everything here is shape arithmetic and tensor ops, never Python branching on tensor values, so the
models trace and export as one graph for prefill (past = 0) and cached decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = list[tuple[Tensor, Tensor]]


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the model dtype: fp16 LayerNorm inputs overflow. For an fp32 model
    the casts are no-ops; for an fp16 export they become the Casts of an fp32 island in the graph."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def default_attention_mask(input_ids: Tensor, past_len: int) -> Tensor:
    return torch.ones(input_ids.shape[0], past_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)


def default_position_ids(attention_mask: Tensor, seq_len: int) -> Tensor:
    """Positions count only real tokens, so left-padded rows get the positions they would have alone."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, positions.shape[1] - seq_len :]


def allowed_keys(attention_mask: Tensor, seq_len: int, window: int | None) -> Tensor:
    """Bool [batch, 1, seq, past+seq]: causal, padding and (GPT-Neo local) window mask.

    Query i sits at cache index past + i and may see key j when j <= past + i, attention_mask[j] is 1 and,
    for a local layer, j > past + i - window (the window counts cache positions, as transformers does).
    """
    total = attention_mask.shape[1]
    q_index = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + (total - seq_len)
    k_index = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    allowed = k_index <= q_index
    if window is not None:
        allowed = allowed & (k_index > q_index - window)
    return allowed.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax in fp32 whatever the model dtype; fully masked rows (pad queries) stay finite."""
    scores = scores.float()
    scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, dims: int) -> Tensor:
    rot, keep = x[..., :dims], x[..., dims:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([rot * cos + rotate_half(rot) * sin, keep], dim=-1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, s, h = x.shape
    return x.view(b, s, heads, h // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, heads * d)


def past_length(past_key_values: KVCache | None) -> int:
    return 0 if not past_key_values else past_key_values[0][0].shape[2]
