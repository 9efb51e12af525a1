"""`neodeploy lint`: is this artifact ready for TensorRT? Everything checkable without a GPU.

1. every op is in the TensorRT ONNX parser's support list (package data `trt_onnx_ops.json`, with its
   source and version), and each node's data type is one that list gives for its op;
2. no If / Loop / Scan;
3. the inputs' dtypes and the bindings they need (INT64 ids and masks bind as INT64 on TensorRT >= 10);
4. shape inference at min / opt / max of both derived optimisation profiles gives the expected logits and
   present shapes;
5. polygraphy's `check lint` (onnxruntime-based), when polygraphy is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx

from neodeploy.profiles import DeploymentProfile, trt_profiles
from neodeploy.core.manifest import Manifest

OPS_FILE = "trt_onnx_ops.json"
DTYPE_BINDINGS = {
    onnx.TensorProto.INT64: "INT64 (TensorRT >= 10 binds it natively)",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.INT32: "INT32",
}


@dataclass
class LintResult:
    name: str
    passed: bool
    detail: str
    items: list[str] = field(default_factory=list)


def supported_ops() -> dict:
    return json.loads(resources.files(__package__).joinpath(OPS_FILE).read_text(encoding="utf-8"))


def check_ops(model: onnx.ModelProto) -> LintResult:
    table = supported_ops()
    used = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    missing = [op for op in used if op not in table["supported"]] + custom
    detail = (f"{len(used)} op types, all in the TensorRT {table['tensorrt_version']} ONNX parser list"
              if not missing else f"not supported by TensorRT {table['tensorrt_version']}: {', '.join(missing)}")
    return LintResult("operators", not missing, detail, used)


_DOC_TYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
              onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
              onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.DOUBLE: "DOUBLE"}


def check_op_types(model: onnx.ModelProto) -> LintResult:
    """Each node's data type (its first input's, or its output's for a node without inputs) against the types
    the parser's support list gives for that op: e.g. an fp64 Mul, or an INT64 MatMul, fails here, not at build."""
    table = supported_ops()["supported"]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    bad, checked = {}, 0
    for node in inferred.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in table:
            continue  # unknown ops are check_ops' finding
        operand = next((n for n in node.input if n), None) or (node.output[0] if node.output else None)
        elem = types.get(operand) if operand else None
        if not elem:
            continue  # not inferable statically; polygraphy and the build judge it
        checked += 1
        allowed = {t.strip() for t in table[node.op_type].split(",")}
        name = _DOC_TYPES.get(elem, onnx.TensorProto.DataType.Name(elem))
        if name not in allowed:
            bad.setdefault(f"{node.op_type} on {name}", node.name)
    detail = (f"{checked} nodes' data types are in the parser's list for their op" if not bad else
              "types the TensorRT parser does not list: " + ", ".join(f"{k} (e.g. {v})" for k, v in list(bad.items())[:5]))
    return LintResult("operator types", not bad, detail, sorted(bad))


def check_control_flow(model: onnx.ModelProto) -> LintResult:
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")})
    return LintResult("control flow", not bad, "no If/Loop/Scan" if not bad else f"graph has {', '.join(bad)} nodes")


def check_bindings(model: onnx.ModelProto) -> LintResult:
    items, bad = [], []
    for value in list(model.graph.input) + list(model.graph.output):
        elem = value.type.tensor_type.elem_type
        binding = DTYPE_BINDINGS.get(elem)
        items.append(f"{value.name}: {onnx.TensorProto.DataType.Name(elem)} -> {binding or 'unsupported'}")
        if binding is None:
            bad.append(value.name)
    return LintResult("bindings", not bad, f"{len(items)} I/O tensors" + (f"; unsupported: {bad}" if bad else ""), items)


def check_shapes(model: onnx.ModelProto, manifest: Manifest, profile: DeploymentProfile) -> LintResult:
    """Concrete shape inference at each (min, opt, max) point of both profiles."""
    heads, head_dim = manifest.spec.num_heads, manifest.spec.head_dim
    items, bad = [], []
    for pname, inputs in trt_profiles(profile, manifest.spec, manifest.max_context).items():
        for k, point in enumerate(("min", "opt", "max")):
            concrete = onnx.ModelProto()
            concrete.CopyFrom(model)
            for value in concrete.graph.input:
                shape = inputs[value.name][k]
                for dim, size in zip(value.type.tensor_type.shape.dim, shape):
                    dim.Clear()
                    dim.dim_value = size
            batch, seq = inputs["input_ids"][k]
            total = inputs["attention_mask"][k][1]
            positions = seq if manifest.onnx.logits == "all" else 1
            want = {"logits": [batch, positions, manifest.spec.vocab_size], "present.0.key": [batch, heads, total, head_dim]}
            try:
                inferred = onnx.shape_inference.infer_shapes(concrete, strict_mode=True, data_prop=True)
            except Exception as exc:  # onnx raises InferenceError and plain RuntimeErrors
                bad.append(f"{pname}/{point}: shape inference failed: {str(exc).splitlines()[0]}")
                continue
            got = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                   for o in inferred.graph.output}
            if None in (got.get("logits") or [None]):
                bad.append(f"{pname}/{point}: logits shape could not be inferred ({got.get('logits')})")
            for name, expected in want.items():
                shape = got.get(name)
                if shape is None or any(g is not None and g != e for g, e in zip(shape, expected)):
                    bad.append(f"{pname}/{point}: {name} inferred {shape}, expected {expected}")
            items.append(f"{pname}/{point}: input_ids {list(inputs['input_ids'][k])}, mask {list(inputs['attention_mask'][k])}"
                         f" -> logits {got.get('logits')}")
    return LintResult("shapes", not bad, "both profiles infer at min/opt/max" if not bad else "; ".join(bad), items)


def check_polygraphy(path: Path) -> LintResult:
    exe = shutil.which("polygraphy") or (str(Path(sys.executable).with_name("polygraphy"))
                                         if Path(sys.executable).with_name("polygraphy").exists() else None)
    if exe is None:
        return LintResult("polygraphy check lint", True, "skipped: polygraphy is not installed (pip install polygraphy onnx-graphsurgeon)")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "lint.json"
        proc = subprocess.run([exe, "check", "lint", str(path), "-o", str(report)], capture_output=True, text=True,
                              timeout=1800)
        if not report.is_file():
            last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            return LintResult("polygraphy check lint", False, f"did not run: {last[0]}")
        data = json.loads(report.read_text())
    failing = data.get("summary", {}).get("failing", [])
    passing = data.get("summary", {}).get("passing", [])
    return LintResult("polygraphy check lint", proc.returncode == 0 and not failing,
                      f"{len(passing)} nodes pass" + (f", {len(failing)} fail: {failing[:5]}" if failing else ""), failing)


def lint(artifact: Path, manifest: Manifest, profile: DeploymentProfile, run_polygraphy: bool = True) -> list[LintResult]:
    path = artifact / manifest.onnx.file
    model = onnx.load(str(path), load_external_data=False)
    results = [check_ops(model), check_op_types(model), check_control_flow(model), check_bindings(model),
               check_shapes(model, manifest, profile)]
    if manifest.dtype != "fp16":
        results.append(LintResult("precision", True, "note: fp32 artifact; TensorRT engines are built from fp16 exports"))
    if run_polygraphy:
        results.append(check_polygraphy(path))
    return results


def lint_table(results: list[LintResult]) -> str:
    width = max(len(r.name) for r in results)
    return "\n".join(f"{r.name:<{width}}  {'ok  ' if r.passed else 'FAIL'}  {r.detail}" for r in results)
