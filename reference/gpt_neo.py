"""GPT-Neo (EleutherAI gpt-neo-125m / 1.3B / 2.7B) in plain PyTorch.

Parameter names mirror transformers' GPTNeoForCausalLM so a Hugging Face state dict loads as is.
Numerics as transformers' eager path: q, k, v without bias; queries NOT scaled by 1/sqrt(head_dim);
q·kᵀ and softmax in fp32; local layers see keys i - window < j <= i; learned absolute positions;
lm_head tied to wte.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neodeploy.reference.layers import (
    ACTIVATIONS,
    KVCache,
    LayerNorm,
    allowed_keys,
    default_attention_mask,
    default_position_ids,
    masked_softmax,
    merge_heads,
    past_length,
    split_heads,
)
from neodeploy.core.spec import ModelSpec
from neodeploy.reference.attention_op import attention_bias
from neodeploy.reference.lengths import Lengths, attend


class SelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.out_proj = nn.Linear(h, h, bias=True)
        self.fused = False

    def use_fused_attention(self) -> None:
        """One [q | k | v] projection replaces the three (the fused op's packed form: one MatMul per layer)."""
        h = self.q_proj.in_features
        self.qkv_proj = nn.Linear(h, 3 * h, bias=False, device="meta")  # no initialisation: the weight is set next
        with torch.no_grad():
            self.qkv_proj.weight = nn.Parameter(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        del self.q_proj, self.k_proj, self.v_proj
        self.fused = True

    def forward(self, x: Tensor, allowed: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused:  # allowed is the additive bias here (see GPTNeo.forward); GPT-Neo does not scale q·kᵀ
            out, k, v = attend(self.qkv_proj(x), None, None, past[0], past[1], allowed, None, None, self.num_heads, 1.0)
            return self.out_proj(out), k, v
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # GPT-Neo's unscaled q·kᵀ overflows fp16: always fp32.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
        probs = masked_softmax(scores, allowed).to(v.dtype)
        return self.out_proj(merge_heads(torch.matmul(probs, v))), k, v


class Attention(nn.Module):
    """Only here so the parameter path reads `attn.attention.*`, as in Hugging Face checkpoints."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention = SelfAttention(spec)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.c_proj = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, kind: str):
        super().__init__()
        self.window = spec.window_size if kind == "local" else None
        self.ln_1 = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.attn = Attention(spec)
        self.ln_2 = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.mlp = MLP(spec)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.wpe = nn.Embedding(spec.max_positions, spec.hidden_size)
        self.h = nn.ModuleList(Block(spec, kind) for kind in spec.attention_layers)
        self.ln_f = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)


class GPTNeo(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        assert spec.family == "gpt_neo"
        self.spec = spec
        self.transformer = Transformer(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.fused = False
        self.by_lengths = False  # the CUDA target's layout (reference/lengths.py)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.spec.tied_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def use_fused_attention(self, max_context: int, by_lengths: bool = False) -> None:
        """Route attention through neodeploy::attention (the CPU export's GroupQueryAttention); needs a cache.
        by_lengths: through neodeploy::attention_by_lengths instead (the CUDA target: rows left-aligned)."""
        if self.fused:
            return
        self.fused, self.by_lengths = True, by_lengths
        for block in self.transformer.h:
            block.attn.attention.use_fused_attention()

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
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(position_ids)
        global_allowed = allowed_keys(attention_mask, seq, None)
        local_allowed = allowed_keys(attention_mask, seq, self.spec.window_size) if self.spec.window_size else None
        if self.by_lengths:
            global_allowed, local_allowed = Lengths(attention_mask), Lengths(attention_mask, self.spec.window_size or 0)
        elif self.fused:
            global_allowed = attention_bias(global_allowed)
            local_allowed = attention_bias(local_allowed) if local_allowed is not None else None
        present: KVCache = []
        hidden = [x]
        for i, block in enumerate(t.h):
            allowed = global_allowed if block.window is None else local_allowed
            past = past_key_values[i] if past_key_values else None
            a, k, v = block.attn.attention(block.ln_1(x), allowed, past)
            x = x + a
            x = x + block.mlp(block.ln_2(x))
            present.append((k, v))
            hidden.append(x)
        logits = self.lm_head(t.ln_f(x[:, -1:] if last_logits_only else x)).float()
        return (logits, present, hidden) if output_hidden_states else (logits, present)
