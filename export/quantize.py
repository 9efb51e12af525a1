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

from neodeploy.errors import UsageError
from neodeploy.export.graph import DATA_SUFFIX, finish_rewrite, list_inputs, set_aside

METHODS = ("int8", "int4")
BLOCK_SIZES = (32, 64, 128)


def _fold_weight_transposes(path: Path) -> onnx.ModelProto:
    """A tied lm_head reaches its MatMul through Transpose(embedding): the quantiser only takes constant weights,
    so give that MatMul its own pre-transposed initializer (the embedding itself stays for the Gather).
    Returns the model as written, weights loaded."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
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
        weight = numpy_helper.to_array(initializers[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(weight.transpose(perm), node.output[0] + "_folded"))
        for user in users:
            user.input[1] = node.output[0] + "_folded"
        folded.append(node)
    if folded:
        for node in folded:
            model.graph.node.remove(node)
        data = path.with_name(path.name + DATA_SUFFIX)
        data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        model = onnx.load(str(path))  # saving moved the weights out of this proto into the data file
    return model


def quantize(path: Path, method: str, block_size: int = 32) -> dict:
    """Quantise model.onnx in place (its fp32 copy is set aside and removed); returns the manifest entry."""
    if method not in METHODS:
        raise UsageError(f"--quantize {method!r} is not supported; choose int8 or int4")
    if method == "int4" and block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size} is not supported; choose 32, 64 or 128")
    quiet = io.StringIO()
    contract = list_inputs(onnx.load(str(path), load_external_data=False))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    with set_aside(path, ".fp32") as source:
        folded = _fold_weight_transposes(source)
        with contextlib.redirect_stdout(quiet):
            if method == "int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 per_channel=True, use_external_data_format=True,
                                 # GroupQueryAttention has no onnx schema, so shape inference leaves the
                                 # tensors after it untyped: they are fp32.
                                 extra_options={"MatMulConstBOnly": True,
                                                "DefaultTensorType": onnx.TensorProto.FLOAT})
                entry = {"method": "int8", "ops": "MatMul -> DynamicQuantizeLinear + MatMulInteger",
                         "weights": "int8 per output channel, symmetric"}
            else:
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                # accuracy_level 4: the kernel quantises each activation block to int8 and multiplies in int8
                # (measured on pythia-160m: decode 5.9 vs 8.0 ms/token, batch 8 17.5 vs 33.9, same top-1 on the
                # trained fixture as fp32 activations).
                quantizer = MatMulNBitsQuantizer(folded, block_size=block_size, is_symmetric=True,
                                                 accuracy_level=4)
                quantizer.process()
                quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
                entry = {"method": "int4", "ops": "MatMul -> MatMulNBits", "block_size": block_size,
                         "weights": "int4 per block, symmetric", "accuracy_level": 4,
                         "activations": "int8 per block inside the kernel"}
    model = finish_rewrite(path, contract)
    entry["quantized_matmuls"] = sum(n.op_type in ("MatMulInteger", "MatMulNBits") for n in model.graph.node)
    return entry
