"""CPU target: onnxruntime's transformer optimizer fuses what it recognises in our graph (SkipLayerNormalization,
BiasGelu / FastGelu) into com.microsoft ops that only onnxruntime runs, so this is never the portable graph."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx

from neodeploy.export.graph import DATA_SUFFIX, finish_rewrite, list_inputs, op_counts, set_aside

FUSED = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "Attention", "MultiHeadAttention",
         "GroupQueryAttention", "RotaryEmbedding")


def fuse(path: Path, spec) -> dict:
    """Rewrite model.onnx in place with onnxruntime's fusions; returns {fused op: count}."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    contract = list_inputs(onnx.load(str(path), load_external_data=False))
    with set_aside(path, ".unfused") as source, contextlib.redirect_stdout(io.StringIO()):
        # GPT-NeoX maps to onnxruntime's BERT fusions and GPT-Neo to GPT-2's; the patterns they match here are
        # the same (SkipLayerNorm, BiasGelu), attention is not fused by either.
        optimized = optimize_model(str(source), model_type="gpt2" if spec.family == "gpt_neo" else "bert",
                                   num_heads=spec.num_heads, hidden_size=spec.hidden_size, opt_level=0)
        optimized.save_model_to_file(str(path), use_external_data_format=True, all_tensors_to_one_file=True)
    written = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p.name != path.name]
    data = path.with_name(path.name + DATA_SUFFIX)
    relocated = None
    if not data.exists() and len(written) == 1:  # the optimizer names its data file itself: normalise it
        written[0].rename(data)
        relocated = data.name
    counts = op_counts(finish_rewrite(path, contract, relocated))
    return {op: counts[op] for op in FUSED if counts[op]}
