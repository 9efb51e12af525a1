"""Weight quantisation for CPU through onnxruntime.quantization: dynamic int8 MatMul, or int4 MatMulNBits.

Only MatMuls with constant weights are quantised (the projections and the lm_head); activations, the
KV cache, LayerNorm and softmax stay fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx

from neodeploy.core.errors import UsageError
from neodeploy.export.graph import DATA_SUFFIX, append_external_data, finish_rewrite, list_inputs, set_aside, working_folder
from neodeploy.export.options import BLOCK_SIZES, DEFAULT_BLOCK, DEFAULT_HEAD_BITS, HEAD_BITS, METHODS


def _fold_weight_transposes(path: Path) -> None:
    """A tied lm_head reaches its MatMul through Transpose(embedding): the quantiser only takes constant weights,
    so give that MatMul its own pre-transposed initializer (the embedding itself stays for the Gather). Only the
    embedding is read, and its transposed copy is appended to the data file: the other weights stay on disk."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[node.input[0]], base_dir=str(path.parent))
        model.graph.initializer.append(numpy_helper.from_array(weight.transpose(perm), node.output[0] + "_folded"))
        del weight
        for user in users:
            user.input[1] = node.output[0] + "_folded"
        folded.append(node)
    if folded:
        for node in folded:
            model.graph.node.remove(node)
        append_external_data(model, path.with_name(path.name + DATA_SUFFIX))
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def _weights_on_demand(folder: Path):
    """While onnxruntime's quantisers run on a graph whose weights are still on disk, `onnx.numpy_helper.to_array`
    (what both call for every weight they quantise) reads a weight into a temporary copy of its TensorProto
    instead of into the graph: one fp32 weight at a time is in memory, never all of them. Run in a child process
    (graph.in_subprocess): the patch is process-wide while it lasts. The dynamic quantiser also saves and
    reloads the model to infer shapes, which would load every weight: shape inference runs on the weight-free
    graph instead, which is what that round trip computes."""
    import copy as copying

    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization import onnx_quantizer
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    original = numpy_helper.to_array
    reload = onnx_quantizer.save_and_reload_model_with_shape_infer

    def infer_in_memory(model):
        inferred = onnx.shape_inference.infer_shapes(copying.deepcopy(model))
        add_infer_metadata(inferred)
        return inferred

    def to_array(tensor, base_dir=""):
        if uses_external_data(tensor) and not tensor.HasField("raw_data"):
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            return original(copy, str(folder))
        return original(tensor, base_dir)

    numpy_helper.to_array, onnx_quantizer.save_and_reload_model_with_shape_infer = to_array, infer_in_memory
    try:
        yield
    finally:
        numpy_helper.to_array, onnx_quantizer.save_and_reload_model_with_shape_infer = original, reload


def _save_with_remaining_weights(model: onnx.ModelProto, source: Path, path: Path) -> None:
    """Weights the quantiser left alone (embeddings, norms) are still external, in the set-aside fp32 data file:
    read them (a small share of the model) and write the whole graph to one new data file beside `path`."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and not tensor.HasField("raw_data"):
            load_external_data_for_tensor(tensor, str(source.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024)


def quantize(path: Path, method: str, block_size: int = DEFAULT_BLOCK, head_bits: int = DEFAULT_HEAD_BITS,
             embedding: bool = True) -> dict:
    """Quantise model.onnx in place (its fp32 copy is set aside and removed); returns the manifest entry.

    Memory: the graph is loaded without its weights and each weight is read when it is quantised, so the peak is
    about the quantised weights plus the largest fp32 one, not the fp32 model plus the copies the quantisers'
    whole-model path makes (measured on pythia-160m: 2.4 GB child before, see the README's memory table).

    embedding: also the token embedding, as 8-bit GatherBlockQuantized (an onnxruntime op: the pipeline asks for it
    where the graph needs onnxruntime anyway, int4 or the cpu target; a portable int8 graph stays standard ONNX)."""
    if method not in METHODS:
        raise UsageError(f"--quantize {method!r} is not supported; choose int8 or int4")
    if method == "int4" and block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size} is not supported; choose 32, 64 or 128")
    if method == "int4" and head_bits not in HEAD_BITS:
        raise UsageError(f"--head-bits {head_bits} is not supported; choose 8 or 4")
    quiet = io.StringIO()
    contract = list_inputs(onnx.load(str(path), load_external_data=False))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    with set_aside(path, ".fp32") as source:
        _fold_weight_transposes(source)
        model = onnx.load(str(source), load_external_data=False)
        # The int4 quantiser reads external weights relative to the working folder.
        with contextlib.redirect_stdout(quiet), _weights_on_demand(source.parent), working_folder(source.parent):
            if method == "int8":
                from onnxruntime.quantization import QuantizationMode, QuantType
                from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
                from onnxruntime.quantization.quant_utils import add_infer_metadata, update_opset_version

                # What quantize_dynamic does, minus its save-and-reload of the whole model with its weights.
                model = onnx.shape_inference.infer_shapes(model)
                add_infer_metadata(model)
                model = update_opset_version(model, QuantType.QInt8)
                quantizer = ONNXQuantizer(
                    model, True, False, QuantizationMode.IntegerOps, False, QuantType.QInt8, QuantType.QUInt8,
                    None, None, None, ["MatMul"],
                    # GroupQueryAttention has no onnx schema, so shape inference leaves the tensors after it
                    # untyped: they are fp32.
                    {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
                quantizer.quantize_model()
                entry = {"method": "int8", "ops": "MatMul -> DynamicQuantizeLinear + MatMulInteger",
                         "weights": "int8 per output channel, symmetric"}
            else:
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                # accuracy_level 4: the kernel quantises each activation block to int8 and multiplies in int8
                # (measured on pythia-160m: decode 5.9 vs 8.0 ms/token, batch 8 17.5 vs 33.9, same top-1 on the
                # trained fixture as fp32 activations).
                # The lm_head carries most of int4's error: on the trained fixture (600 steps, blocks of 32) an 8-bit
                # head takes teacher-forced top-1 from 91.8 % to 98.8 % and the mean KL from 0.0043 to 0.0004, for ~5-10 %
                # of decode on pythia-160m / 410m (their heads are a third / a sixth of the weights).
                head = _head_matmul(model) if head_bits == 8 else None
                quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                                 nodes_to_exclude=[head] if head else None)
                quantizer.process()
                if head:
                    quantizer = MatMulNBitsQuantizer(quantizer.model.model, bits=8, block_size=32, is_symmetric=True,
                                                     accuracy_level=4, nodes_to_include=[head])
                    quantizer.process()
                entry = {"method": "int4", "ops": "MatMul -> MatMulNBits", "block_size": block_size,
                         "weights": "int4 per block, symmetric", "accuracy_level": 4,
                         "activations": "int8 per block inside the kernel",
                         "head": {"bits": 8, "block_size": 32} if head else {"bits": 4, "block_size": block_size}}
            quantized = quantizer.model.model
            entry["embedding"] = _quantize_embedding(quantized, source.parent) if embedding else None
        _save_with_remaining_weights(quantized, source, path)
    model = finish_rewrite(path, contract)
    entry["quantized_matmuls"] = sum(n.op_type in ("MatMulInteger", "MatMulNBits") for n in model.graph.node)
    return entry


EMBEDDING_BLOCK = 32


def _quantize_embedding(model: onnx.ModelProto, folder: Path) -> dict | None:
    """The token embedding as 8-bit blocks (GatherBlockQuantized): in fp32 it was the largest tensor of a quantised
    export (pythia-160m int4: 154 of 225 MB on disk and in memory). A step reads one row of it, so speed does not
    change; 8 bits keep its error at int8's (about 0.4 % of a row's largest value). Symmetric, stored as uint8
    with zero point 128, as the op takes it."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    node = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"
                 and n.input[0] in initializers), None)
    if node is None:
        return None
    table = initializers[node.input[0]]
    if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or table.dims[1] % EMBEDDING_BLOCK:
        return None
    weight = numpy_helper.to_array(table, str(folder))
    rows, width = weight.shape
    blocks = weight.reshape(rows, width // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    scale = np.abs(blocks).max(-1) / 127
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    del weight, blocks
    base = node.input[0]
    model.graph.initializer.extend([
        numpy_helper.from_array(codes.astype(np.uint8).reshape(rows, width), base + "_q8"),
        numpy_helper.from_array(scale.astype(np.float32), base + "_scales"),
        numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), base + "_zero_points")])
    quantized = helper.make_node("GatherBlockQuantized", [base + "_q8", "input_ids", base + "_scales",
                                 base + "_zero_points"], list(node.output), name=node.name + "_Q8",
                                 domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=EMBEDDING_BLOCK,
                                 bits=8)
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(position, quantized)
    if not any(base in n.input for n in model.graph.node):
        model.graph.initializer.remove(table)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"op": "GatherBlockQuantized", "bits": 8, "block_size": EMBEDDING_BLOCK}


def _head_matmul(model: onnx.ModelProto) -> str | None:
    """The MatMul that computes the logits (the graph's first output), if a MatMul does."""
    logits = model.graph.output[0].name
    return next((n.name for n in model.graph.node if n.op_type == "MatMul" and logits in n.output), None)
