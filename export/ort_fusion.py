"""CPU target: onnxruntime's transformer optimizer fuses what it recognises in our graph (SkipLayerNormalization,
BiasGelu / FastGelu) into com.microsoft ops that only onnxruntime runs, so this is never the portable graph."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx

from neodeploy.export.graph import DATA_SUFFIX, append_external_data, finish_rewrite, list_inputs, op_counts, working_folder

FUSED = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "Attention", "MultiHeadAttention",
         "GroupQueryAttention", "RotaryEmbedding")


def fuse(path: Path, spec) -> dict:
    """Rewrite model.onnx in place with onnxruntime's fusions; returns {fused op: count}.

    The weights never enter memory: the optimizer gets the graph with its large initializers still external
    (pointing into model.onnx.data, which is not rewritten), and its Python fusions match on structure and the
    small constants stored inline. The working folder is the graph's while it runs, so that a fusion that does
    read a weight finds the data file beside the graph and reads only that weight."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = onnx.load(str(path), load_external_data=False)
    contract = list_inputs(model)
    with contextlib.redirect_stdout(io.StringIO()), working_folder(path.parent):
        # GPT-NeoX maps to onnxruntime's BERT fusions and GPT-Neo to GPT-2's; the patterns they match here are
        # the same (SkipLayerNorm, BiasGelu), attention is not fused by either.
        optimized = optimize_model(model, model_type="gpt2" if spec.family == "gpt_neo" else "bert",
                                   num_heads=spec.num_heads, hidden_size=spec.hidden_size, opt_level=0).model
    append_external_data(optimized, path.with_name(path.name + DATA_SUFFIX))  # what a fusion created, if large
    onnx.save_model(optimized, str(path))
    counts = op_counts(finish_rewrite(path, contract))
    return {op: counts[op] for op in FUSED if counts[op]}
