"""GPT-NeoX (Pythia, gpt-neox-20b, Dolly v2, StableLM-alpha, RedPajama-INCITE, ...) in plain PyTorch.

Parameter names mirror transformers' GPTNeoXForCausalLM (with the v4 name `embed_out`).
Numerics as transformers' eager path: fused query_key_value viewed [heads, 3, head_dim]; rotary on the
first int(head_dim * rotary_pct) dims with rotate_half, cos/sin computed in fp32; scale 1/sqrt(head_dim);
softmax in fp32; parallel residual x + attn(ln1(x)) + mlp(ln2(x)) or sequential; untied embed_out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neodeploy.reference.layers import (
    ACTIVATIONS,
    KVCache,
    LayerNorm,
    allowed_keys,
    apply_rotary,
    default_attention_mask,
    default_position_ids,
    masked_softmax,
    merge_heads,
    past_length,
)
from neodeploy.core.spec import ModelSpec
from neodeploy.reference.attention_op import attention_bias, packed_rows
from neodeploy.reference.lengths import Lengths, attend


def rotary_cos_sin(spec: ModelSpec, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [batch, 1, seq, rotary_dims] in fp32; linear scaling divides the frequencies by the factor."""
    dims = spec.rotary_dims
    exponent = torch.arange(0, dims, 2, dtype=torch.int64, device=position_ids.device).float() / dims
    inv_freq = 1.0 / (spec.rotary_base**exponent)
    if spec.rope_scaling_type == "linear":
        inv_freq = inv_freq / spec.rope_scaling_factor
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.head_dim, self.rotary_dims = spec.num_heads, spec.head_dim, spec.rotary_dims
        self.scale = spec.head_dim**-0.5
        self.query_key_value = nn.Linear(h, 3 * h, bias=spec.attention_bias)
        self.dense = nn.Linear(h, h, bias=spec.attention_bias)
        self.fused = False
        self.packed = False  # query_key_value's rows are in the fused op's packed order (use_fused_attention)
        self.scale_queries = False  # set by the export (GPTNeoX.scale_queries_first)
        self.cos_cache = self.sin_cache = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        if self.fused:
            return self._fused(x, cos, sin, allowed, past)
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q = apply_rotary(q, cos, sin, self.rotary_dims)
        k = apply_rotary(k, cos, sin, self.rotary_dims)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if self.scale_queries:
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
        else:  # transformers' eager order, so the reference stays bit-for-bit its oracle
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        probs = masked_softmax(scores, allowed).to(v.dtype)
        return self.dense(merge_heads(torch.matmul(probs, v))), k, v

    def _fused(self, x, cos, sin, allowed, past):
        # [batch, seq, heads, head_dim] throughout, so q, k, v reach the fused op as [batch, seq, hidden] without
        # a transpose; allowed arrives as the additive bias. With cos / sin tables (use_fused_attention) rotary
        # happens inside the op, otherwise here at position_ids.
        b, s, _ = x.shape
        if self.packed:
            out, k, v = attend(self.query_key_value(x), None, None, past[0], past[1], allowed,
                                        self.cos_cache, self.sin_cache, self.num_heads, self.scale)
            return self.dense(out), k, v
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if self.cos_cache is None:
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
            q, k = apply_rotary(q, cos, sin, self.rotary_dims), apply_rotary(k, cos, sin, self.rotary_dims)
        out, k, v = attend(q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1), past[0], past[1],
                           allowed, self.cos_cache, self.sin_cache, self.num_heads, self.scale)
        return self.dense(out), k, v


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.dense_4h_to_h = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.parallel = spec.parallel_residual
        self.input_layernorm = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.attention = Attention(spec)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, allowed, past):
        a, k, v = self.attention(self.input_layernorm(x), cos, sin, allowed, past)
        if self.parallel:
            x = x + a + self.mlp(self.post_attention_layernorm(x))
        else:
            x = x + a
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Body(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_in = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.num_layers))
        self.final_layer_norm = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)


class GPTNeoX(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        assert spec.family == "gpt_neox"
        self.spec = spec
        self.gpt_neox = Body(spec)
        self.embed_out = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.fused = False
        self.by_lengths = False  # the CUDA target's layout (reference/lengths.py)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.spec.tied_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def use_fused_attention(self, max_context: int, by_lengths: bool = False) -> None:
        """Route attention through neodeploy::attention (the CPU export's GroupQueryAttention); needs a cache.
        Rotary moves into the op, with cos / sin tables for every position computed as rotary_cos_sin does, where
        onnxruntime's kernel takes the table width (ModelSpec.rotary_in_kernel); then query_key_value's rows are
        also reordered into the op's packed [q | k | v] form (the same numbers: a permutation of the outputs).
        by_lengths: neodeploy::attention_by_lengths instead (the CUDA target: rows left-aligned); the tables take the
        model's dtype, as the kernel wants them (rotary_cos_sin's fp32 values, rounded as apply_rotary rounds them)."""
        if self.fused:
            return
        half = self.spec.rotary_dims // 2
        tables = (None, None)
        if self.spec.rotary_in_kernel:
            positions = torch.arange(max(max_context, self.spec.max_positions)).unsqueeze(0)
            cos, sin = rotary_cos_sin(self.spec, positions)
            tables = (cos[0, 0, :, :half].contiguous(), sin[0, 0, :, :half].contiguous())
            if by_lengths:
                dtype = self.embed_out.weight.dtype
                tables = (tables[0].to(dtype), tables[1].to(dtype))
        self.fused, self.by_lengths = True, by_lengths
        for layer in self.gpt_neox.layers:
            layer.attention.fused = True
            layer.attention.cos_cache, layer.attention.sin_cache = tables
            if self.spec.rotary_in_kernel:
                projection, rows = layer.attention.query_key_value, packed_rows(self.spec.num_heads, self.spec.head_dim)
                with torch.no_grad():
                    projection.weight.copy_(projection.weight[rows])
                    if projection.bias is not None:
                        projection.bias.copy_(projection.bias[rows])
                layer.attention.packed = True

    def scale_queries_first(self) -> None:
        """Scale q by 1/sqrt(head_dim) before q·kᵀ instead of the scores after it (equal up to rounding): TensorRT
        fuses attention only when Q or K is scaled before the first MatMul. The export sets it; the reference
        keeps transformers' order."""
        for layer in self.gpt_neox.layers:
            layer.attention.scale_queries = True

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        output_hidden_states: bool = False,
        last_logits_only: bool = False,
    ) -> tuple[Tensor, KVCache] | tuple[Tensor, KVCache, list[Tensor]]:
        """(logits fp32, present); with output_hidden_states also [embeddings, block 1, ..., block L] outputs.
        last_logits_only computes the lm_head for the last position only (generation reads nothing else)."""
        seq = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = default_attention_mask(input_ids, past_length(past_key_values))
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, seq)
        cos, sin = rotary_cos_sin(self.spec, position_ids)
        allowed = allowed_keys(attention_mask, seq, None)
        if self.by_lengths:
            allowed = Lengths(attention_mask)
        elif self.fused:
            allowed = attention_bias(allowed)
        x = self.gpt_neox.embed_in(input_ids)
        present: KVCache = []
        hidden = [x]
        for i, layer in enumerate(self.gpt_neox.layers):
            x, k, v = layer(x, cos, sin, allowed, past_key_values[i] if past_key_values else None)
            present.append((k, v))
            hidden.append(x)
        logits = self.embed_out(self.gpt_neox.final_layer_norm(x[:, -1:] if last_logits_only else x)).float()
        return (logits, present, hidden) if output_hidden_states else (logits, present)
