"""The CUDA target's graph steps after the trace (the attention itself is lowered by export/attention.py).

Rows are left-aligned and masks right-padded (runtime/aligned.py), so a prompt row's last real token is not the last
column: the last-position cut before the lm_head becomes a per-row gather at min(seq, ReduceSum(mask)) - 1 (a
right-padded prompt: its length - 1; a decode step or a later chunk, where every fed token is real: seq - 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from neodeploy.export.graph import nearest_slice


def last_real_logits(path: Path) -> None:
    """Rewrite model.onnx's last-position Slice (x[:, -1:]) into the per-row gather of each row's last real token."""
    model = onnx.load(str(path), load_external_data=False)
    cut = nearest_slice(model, "logits")
    x, out = cut.input[0], cut.output[0]
    name = lambda s: f"last_real_{s}"  # noqa: E731
    const = lambda n, values: helper.make_tensor(name(n), TensorProto.INT64, [len(values)], values)  # noqa: E731
    model.graph.initializer.extend([const("axis", [1]), const("one", [1]), const("two", [2])])
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", name("axis")], [name("real")], keepdims=1),  # [b, 1]
        helper.make_node("Shape", ["input_ids"], [name("seq")], start=1, end=2),  # [1]
        helper.make_node("Min", [name("real"), name("seq")], [name("count")]),
        helper.make_node("Sub", [name("count"), name("one")], [name("index")]),  # [b, 1]
        helper.make_node("Unsqueeze", [name("index"), name("two")], [name("index3")]),  # [b, 1, 1]
        helper.make_node("Shape", [x], [name("batch")], start=0, end=1),
        helper.make_node("Shape", [x], [name("hidden")], start=2, end=3),
        helper.make_node("Concat", [name("batch"), name("one"), name("hidden")], [name("shape")], axis=0),
        helper.make_node("Expand", [name("index3"), name("shape")], [name("gather")]),  # [b, 1, hidden]
        helper.make_node("GatherElements", [x, name("gather")], [out], axis=1),
    ]
    position = list(model.graph.node).index(cut)
    model.graph.node.remove(cut)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    onnx.save_model(model, str(path))


def copy_rows_graph(dtype) -> bytes:
    """The runtime's row-copy graph (runtime/aligned.py holds its bytes, as the runtime does not import onnx):
    out = Pad(x[:, :, :width], pads), rows of one cache pool copied into another's at their own indices, run on the
    backend's provider so a CUDA pool's rows move on the device."""
    elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
             helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [1], [2])),
             helper.make_node("Slice", ["x", "zero", "width", "axis"], ["kept"]),
             helper.make_node("Pad", ["kept", "pads"], ["out"])]
    graph = helper.make_graph(nodes, "copy_rows", [
        helper.make_tensor_value_info("x", elem, ["rows", "heads", "source", "dim"]),
        helper.make_tensor_value_info("width", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("pads", TensorProto.INT64, [8])],
        [helper.make_tensor_value_info("out", elem, ["rows", "heads", "target", "dim"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model.SerializeToString()
