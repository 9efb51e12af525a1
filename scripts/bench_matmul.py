"""The quantised MatMul kernels onnxruntime offers, alone, on pythia-160m's layer shapes.

    python scripts/bench_matmul.py [--rows 1,128] [--layers 12] [--threads 2]

Each configuration is a graph of `--layers` layers' four projections (768x2304, 768x768, 768x3072, 3072x768;
random weights), quantised as the export would quantise it, run with `--rows` activation rows (1: a decode
step, 128: a 128-token prefill). The sessions alternate, with a pause between them so that one session's
spinning threads do not slow the next. Prints ms per layer and, for one row, the weight bytes read per second.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 768
SHAPES = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)]
# name: (description, bytes per weight)
CONFIGS = {
    "fp32": ("MatMul, fp32 weights", 4.0),
    "int8": ("DynamicQuantizeLinear + MatMulInteger, int8 per channel (--quantize int8)", 1.0),
    "int4-b32": ("MatMulNBits int4 block 32, accuracy level 4 (--block-size 32)", 0.5 + 4 / 32),
    "int4-b64": ("MatMulNBits int4 block 64, accuracy level 4 (--quantize int4, the default block)", 0.5 + 4 / 64),
    "int4-b128": ("MatMulNBits int4 block 128, accuracy level 4 (--block-size 128)", 0.5 + 4 / 128),
    "int4-b32-fp32act": ("MatMulNBits int4 block 32, accuracy level 1 (fp32 activations)", 0.5 + 4 / 32),
    "int8-nbits": ("MatMulNBits 8-bit block 32, accuracy level 4", 1.0 + 4 / 32),
}


def layers_graph(rows: int, layers: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for layer in range(layers):
        for j, (k, n) in enumerate(SHAPES):
            i = 4 * layer + j
            weights.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), f"w{i}"))
            source = {0: "x", 1: f"q{i - 1}", 2: "x", 3: f"y{i - 1}"}[j]
            nodes.append(helper.make_node("MatMul", [source, f"w{i}"], [f"y{i}"]))
            if j == 0:  # the attention output projection reads a hidden-sized slice of the qkv projection
                nodes.append(helper.make_node("Slice", [f"y{i}", "zero", "hidden", "one"], [f"q{i}"]))
            if j in (1, 3):
                outputs.append(f"y{i}")
    weights += [numpy_helper.from_array(np.array([v]), name) for name, v in (("zero", 0), ("hidden", HIDDEN), ("one", 1))]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, HIDDEN])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def quantised(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    if name == "fp32":
        return model
    if name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, Path(tmp) / "in.onnx")
            quantize_dynamic(Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
            return onnx.load(Path(tmp) / "out.onnx")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 8 if name == "int8-nbits" else 4
    block = int(name.split("-b")[1].split("-")[0]) if "-b" in name else 32
    accuracy = 1 if name.endswith("fp32act") else 4
    quantizer = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=True, accuracy_level=accuracy, bits=bits)
    quantizer.process()
    return quantizer.model.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,128", help="comma-separated activation rows (default 1,128)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the quantisers log every weight
    names = args.configs.split(",")
    params = sum(k * n for k, n in SHAPES) * args.layers
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = args.threads, 3
    for rows in (int(r) for r in args.rows.split(",")):
        sessions = {name: ort.InferenceSession(quantised(name, layers_graph(rows, args.layers)).SerializeToString(),
                                               options, providers=["CPUExecutionProvider"]) for name in names}
        feed = {"x": np.random.default_rng(1).random((rows, HIDDEN), dtype=np.float32)}
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name, session in sessions.items():
                time.sleep(0.05)
                session.run(None, feed)
                start = time.perf_counter()
                for _ in range(5):
                    session.run(None, feed)
                times[name].append((time.perf_counter() - start) / 5 / args.layers)
        print(f"{rows} row(s), {args.layers} layers, {args.threads} threads, median of {args.repeat}:")
        for name in names:
            seconds = statistics.median(times[name])
            rate = f"  {params / args.layers * CONFIGS[name][1] / seconds / 1e9:5.1f} GB/s of weights" if rows == 1 else ""
            print(f"  {name:17s} {seconds * 1e3:7.3f} ms/layer{rate}   {CONFIGS[name][0]}")
        del sessions


if __name__ == "__main__":
    main()
