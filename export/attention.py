"""ONNX translation of neodeploy::attention (reference/attention_op.py) to com.microsoft.GroupQueryAttention.

onnx ships no schema for onnxruntime's contrib ops and the exporter needs one to build a node, so the subset of
GroupQueryAttention's signature we use is declared here. GroupQueryAttention gives the CPU target two things the
portable graph cannot have: one kernel per layer instead of ~25 small ops, and a KV cache updated in place —
when the caller binds present.N.key to the same buffer as past_key_values.N.key (with room for the new tokens),
the kernel writes the new keys into it instead of concatenating a new tensor every step. Given a past that holds
exactly the previous tokens, it concatenates like the portable graph, so plain onnxruntime.run works too.

With k and v absent, q is the packed [q | k | v] projection (GroupQueryAttention's packed-QKV form): one MatMul
feeds the kernel directly.

The cache layout is the portable graph's (left-padded rows, one total length): seqlens_k is total - 1 for every
row and padding, causality and GPT-Neo's local window all arrive in attention_bias.
"""

from __future__ import annotations

from onnx import TensorProto, defs, helper
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

_P = defs.OpSchema.FormalParameter
_OPTIONAL = defs.OpSchema.FormalParameterOption.Optional


def _schema() -> defs.OpSchema:
    inputs = [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
              ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
              ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "I", True),
              ("attention_bias", "T", True)]
    attributes = [defs.OpSchema.Attribute(name, kind, "") for name, kind in (
        ("num_heads", defs.OpSchema.AttrType.INT), ("kv_num_heads", defs.OpSchema.AttrType.INT),
        ("scale", defs.OpSchema.AttrType.FLOAT), ("do_rotary", defs.OpSchema.AttrType.INT),
        ("rotary_interleaved", defs.OpSchema.AttrType.INT), ("local_window_size", defs.OpSchema.AttrType.INT))]
    return defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[_P(name, kind, param_option=_OPTIONAL) if optional else _P(name, kind) for name, kind, optional in inputs],
        outputs=[_P("output", "T"), _P("present_key", "T"), _P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=attributes,
    )


_GQA = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _schema())


def _attention(q, k, v, past_k, past_v, bias, cos_cache, sin_cache, num_heads: int, scale: float):
    # The total length comes from the bias (built from attention_mask), not from past_k: with an in-place
    # cache past_k is the whole buffer.
    total = op.Cast(op.Shape(bias, start=3, end=4), to=TensorProto.INT32)
    one = op.Constant(value=helper.make_tensor("one", TensorProto.INT32, [1], [1]))
    # The batch from the bias too: every layer's seqlens_k is then one subexpression, computed once.
    seqlens_k = op.Expand(op.Sub(total, one), op.Shape(bias, start=0, end=1))
    # Rotary inside the kernel rotates at the cache index (seqlens_k based), as the fused op's reference does.
    return _GQA(q, k, v, past_k, past_v, seqlens_k, op.Squeeze(total), cos_cache, sin_cache, None, bias,
                num_heads=num_heads, kv_num_heads=num_heads, scale=scale, do_rotary=int(cos_cache is not None),
                rotary_interleaved=0)


def _attention_by_lengths(q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads: int,
                          scale: float, window: int):
    """The CUDA target (reference/lengths.py): no attention_bias. Rows are left-aligned, so a row's real tokens are
    its length: seqlens_k = ReduceSum(attention_mask) - 1 per row, total_sequence_length the mask's width, and the
    kernel masks causally and, on a local layer, to the `window` latest keys (onnxruntime >= 1.23 counts the query
    itself in local_window_size, as GPT-Neo's window does)."""
    axis = op.Constant(value=helper.make_tensor("axis", TensorProto.INT64, [1], [1]))
    one = op.Constant(value=helper.make_tensor("one", TensorProto.INT32, [1], [1]))
    lengths = op.Cast(op.ReduceSum(attention_mask, axis, keepdims=0), to=TensorProto.INT32)
    total = op.Squeeze(op.Cast(op.Shape(attention_mask, start=1, end=2), to=TensorProto.INT32))
    return _GQA(q, k, v, past_k, past_v, op.Sub(lengths, one), total, cos_cache, sin_cache, None, None,
                num_heads=num_heads, kv_num_heads=num_heads, scale=scale, do_rotary=int(cos_cache is not None),
                rotary_interleaved=0, local_window_size=window if window else -1)


def translation_table() -> dict:
    from neodeploy.reference.attention_op import fused_attention  # importing it registers torch.ops.neodeploy.attention
    from neodeploy.reference.lengths import attention_by_lengths  # and neodeploy.attention_by_lengths

    return {fused_attention._opoverload: _attention, attention_by_lengths._opoverload: _attention_by_lengths}
