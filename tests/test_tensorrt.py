"""TensorRT path: deployment profiles, their TensorRT optimisation profiles, lint — all on CPU — and the
GPU-only engine tests, which skip with the reason where TensorRT or a CUDA GPU is absent."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from conftest import cli, tiny_neo, tiny_neox
from neodeploy.profiles import ProfileError, load_profile, shipped, trt_profiles


def _shape(max_context=2048, layers=2):
    from neodeploy.core.spec import PRESETS

    return PRESETS["pythia-14m"].replace(num_heads=4, hidden_size=64, num_layers=layers, vocab_size=320), max_context


def test_shipped_profiles():
    assert shipped() == ["batch", "chat", "edge"]
    chat, batch, edge = load_profile("chat"), load_profile("batch"), load_profile("edge")
    assert (chat.batch.max, chat.prompt.max, chat.context.max) == (1, 1024, 2048)
    assert (batch.batch.min, batch.batch.max, batch.prompt.max, batch.context.max) == (1, 16, 512, 1024)
    assert (edge.batch.max, edge.prompt.max, edge.context.max) == (1, 256, 512)


def test_trt_profiles_are_consistent_for_every_shipped_profile():
    for name in shipped():
        profile = load_profile(name)
        derived = trt_profiles(profile, *_shape())
        assert set(derived) == {"context", "generation"}
        for which, inputs in derived.items():
            assert len(inputs) == 3 + 2 * 2
            for k in range(3):  # min, opt, max
                b, s = inputs["input_ids"][k]
                mb, total = inputs["attention_mask"][k]
                kb, heads, past, head_dim = inputs["past_key_values.1.value"][k]
                assert b == mb == kb and (heads, head_dim) == (4, 16)
                assert total == past + s  # mask length = past + seq at min, opt and max
                assert inputs["position_ids"][k] == (b, s)
                if which == "context":
                    assert past == 0 and profile.prompt.min <= s <= profile.prompt.max
                else:
                    assert s == 1 and 1 <= past <= profile.context.max - 1
            for name_, (lo, opt, hi) in inputs.items():
                assert all(a <= o <= c for a, o, c in zip(lo, opt, hi)), name_
        assert derived["generation"]["attention_mask"][2] == (profile.batch.max, profile.context.max)
        assert derived["context"]["input_ids"][2] == (profile.batch.max, profile.prompt.max)


def test_profiles_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ProfileError, match="needs a context of 2048 tokens but the artifact serves at most 1024"):
        trt_profiles(load_profile("chat"), *_shape(max_context=1024))
    with pytest.raises(ProfileError, match="unknown profile 'huge'"):
        load_profile("huge")
    bad = tmp_path / "bad.toml"
    for text, message in (
        ("[batch]\nmin=1\nopt=1\nmax=1\n[prompt]\nmin=1\nopt=64\nmax=512\n[context]\nopt=256\nmax=512\n", "no room"),
        ("[batch]\nmin=2\nopt=1\nmax=4\n[prompt]\nmin=1\nopt=8\nmax=16\n[context]\nopt=32\nmax=64\n", "min <= opt <= max"),
        ("[batch]\nmin=1\nopt=1\nmax=1\n[prompt]\nmin=1\nopt=8\nmax=16\n", "no \\[context\\] table"),
        ("[batch\n", "not valid TOML"),
    ):
        bad.write_text(text)
        with pytest.raises(ProfileError, match=message):
            load_profile(bad)
    good = tmp_path / "mine.toml"
    good.write_text("name='mine'\n[batch]\nmin=1\nopt=2\nmax=4\n[prompt]\nmin=1\nopt=8\nmax=16\n[context]\nopt=32\nmax=64\n")
    assert trt_profiles(load_profile(good), *_shape())["generation"]["attention_mask"][2] == (4, 64)


@pytest.fixture(scope="module", params=["gpt_neo", "gpt_neox"])
def fp16_artifact(request, exported):
    spec = (tiny_neo if request.param == "gpt_neo" else tiny_neox)(max_positions=2048)
    return exported(f"trt-{request.param}", spec, "fp16")[1]


def test_lint_passes_on_fp16_exports_for_every_shipped_profile(fp16_artifact):
    proc = cli("lint", fp16_artifact, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert len(re.findall(r"^operators\s+ok", out, re.M)) == 3 and len(re.findall(r"^shapes\s+ok", out, re.M)) == 3
    assert len(re.findall(r"^operator types\s+ok", out, re.M)) == 3
    assert re.search(r"^polygraphy check lint\s+ok\s+\d+ nodes pass", out, re.M)
    assert "lint passed" in proc.stdout


def test_lint_catches_what_tensorrt_cannot_build(fp16_artifact, tmp_path):
    import shutil

    import onnx

    from neodeploy.export.lint import check_op_types, lint
    from neodeploy.core.manifest import read_manifest

    bad = tmp_path / "bad"
    shutil.copytree(fp16_artifact, bad)
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type = "Unique"  # a real ONNX op the TensorRT parser lacks
    onnx.save_model(model, str(bad / "model.onnx"))
    results = {r.name: r for r in lint(bad, read_manifest(bad), load_profile("edge"), run_polygraphy=False)}
    assert not results["operators"].passed and "Unique" in results["operators"].detail
    # A supported op on a type the parser does not list for it (MatMul on INT64) fails the type check.
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    ids = model.graph.input[0].name
    model.graph.node.append(onnx.helper.make_node("MatMul", [ids, ids], ["ids_squared"], name="int_matmul"))
    types = check_op_types(model)
    assert not types.passed and "MatMul on INT64" in types.detail
    proc = cli("lint", bad, "--profile", "chat", timeout=600)
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr  # an edited graph is caught first
    from neodeploy.core.files import sha256

    manifest = json.loads((bad / "neodeploy.json").read_text())
    manifest["files"]["model.onnx"] = sha256(bad / "model.onnx")  # as if it had been exported so
    (bad / "neodeploy.json").write_text(json.dumps(manifest))
    proc = cli("lint", bad, "--profile", "chat", timeout=600)
    assert proc.returncode == 1 and "lint FAILED" in proc.stdout


def test_lint_and_check_follow_a_last_position_logits_export(exported):
    from neodeploy.export.lint import lint
    from neodeploy.runtime import load
    from neodeploy.runtime.check import run_check
    from neodeploy.core.manifest import read_manifest

    _, art = exported("trt-gpt_neox", tiny_neox(max_positions=2048), "fp16", logits="last")
    manifest = read_manifest(art)
    for name in shipped():
        shapes = next(r for r in lint(art, manifest, load_profile(name), run_polygraphy=False) if r.name == "shapes")
        assert shapes.passed, shapes.detail
        assert all(item.endswith(", 1, 320]") for item in shapes.items), shapes.items  # logits [batch, 1, vocab]
    assert all(r.passed for r in run_check(load(art)))


def _scores_matmuls(model):
    """For each Softmax: the MatMul its scores come from (q·kᵀ) and the nodes in between, walking back over the
    mask ops (a Shape ends a walk: only its input's shape is read)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        matmuls, between, todo, seen = [], [], [softmax.input[0]], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or id(node) in seen or node.op_type == "Shape":
                continue
            seen.add(id(node))
            if node.op_type == "MatMul":
                matmuls.append(node)
                continue
            between.append(node)
            todo.extend(node.input)
        found.append((matmuls, between))
    return producer, found


def _scalar(model, producer, name):
    import onnx
    from onnx import numpy_helper

    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    node = producer.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = onnx.helper.get_attribute_value(node.attribute[0])
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _scales(model, producer, node, scale) -> bool:
    """Is `node` a multiplication by `scale` (Mul by it, or Div by its inverse)?"""
    import math

    want = {"Mul": scale, "Div": 1 / scale}.get(node.op_type)
    values = [_scalar(model, producer, name) for name in node.input]
    return want is not None and any(v is not None and math.isclose(v, want, rel_tol=1e-3) for v in values)


def test_fp16_attention_scales_q_before_q_kT_for_tensorrt_fusion(fp16_artifact):
    """TensorRT fuses attention only when Q (or K) is scaled before the first MatMul; GPT-Neo scales nothing and
    keeps q·kᵀ in fp32."""
    import onnx

    from neodeploy.core.manifest import read_manifest

    spec = read_manifest(fp16_artifact).spec
    model = onnx.load(str(fp16_artifact / "model.onnx"), load_external_data=False)
    producer, found = _scores_matmuls(model)
    assert len(found) == spec.num_layers
    scale = spec.head_dim**-0.5
    for matmuls, between in found:
        assert len(matmuls) == 1, [m.name for m in matmuls]
        qk = matmuls[0]
        q, k = (producer.get(name) for name in qk.input)
        assert k is not None and k.op_type == "Transpose"  # kᵀ: the other input is the q side
        assert not any(_scales(model, producer, node, scale) for node in between)  # no scaling of the scores
        if spec.family == "gpt_neox":
            assert q is not None and _scales(model, producer, q, scale), q
        else:
            assert q.op_type == "Cast" and q.attribute[0].i == onnx.TensorProto.FLOAT
            assert not any(node.op_type in ("Mul", "Div") for node in between)


def _has_tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    from neodeploy.runtime.gpu import gpu_info

    try:
        gpu_info()
    except Exception as exc:  # no driver, no device
        return f"no CUDA GPU: {exc}"
    return None


def test_build_engine_without_tensorrt_exits_2(fp16_artifact):
    if _has_tensorrt_and_gpu() is None:
        pytest.skip("TensorRT and a GPU are present here; this test covers machines without them")
    before = json.loads((fp16_artifact / "neodeploy.json").read_text())
    proc = cli("build-engine", fp16_artifact, "--profile", "edge", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr
    if importlib.util.find_spec("tensorrt") is None:  # the message names exactly what is missing
        assert "the tensorrt package is not installed" in proc.stderr
    assert json.loads((fp16_artifact / "neodeploy.json").read_text()) == before
    assert not (fp16_artifact / "model.engine").exists()


gpu = pytest.mark.skipif(_has_tensorrt_and_gpu() is not None, reason=str(_has_tensorrt_and_gpu()))


@gpu
def test_engine_build_generate_and_check_on_gpu(fp16_artifact, tmp_path):  # pragma: no cover - needs a GPU
    import shutil

    import numpy as np

    from neodeploy.core.tolerances import TOLERANCES
    from neodeploy.runtime import load
    from neodeploy.runtime.batch import DecodeBatch
    from neodeploy.runtime.check import clear_preference, run_check

    art = tmp_path / "art"
    shutil.copytree(fp16_artifact, art)
    # batch: up to 16 sequences and 512-token prompts, so the golden cases (batch 3, 300 tokens) fit.
    proc = cli("build-engine", art, "--profile", "batch", "--timing-cache", tmp_path / "timing.cache", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((art / "neodeploy.json").read_text())
    assert manifest["engine"]["profile"]["name"] == "batch" and (tmp_path / "timing.cache").is_file()
    trt_model, ort_model = load(art, backend="tensorrt"), load(art)
    prompts = [[5, 17, 33, 2, 250, 9], [42, 8]]
    ours, theirs = trt_model.generate(prompts, max_new_tokens=8), ort_model.generate(prompts, max_new_tokens=8)
    assert [len(g.output_ids) for g in ours] == [8, 8]
    # Random weights give near ties that fp16 rounding in two kernels may resolve differently: a different first
    # token fails only where onnxruntime prefers its own by more than the fp16 tolerance (the golden check's rule).
    first = DecodeBatch(ort_model.backend).prefill(prompts, ort_model.pad_token_id, capacity=16)
    for row, (mine, want) in enumerate(zip(ours, theirs)):
        assert want.output_ids[0] == int(first[row].argmax())
        logits, tolerance = first[row], TOLERANCES[ort_model.manifest.precision].max_rel_error
        assert not clear_preference(logits[want.output_ids[0]], logits[mine.output_ids[0]], tolerance,
                                    float(np.abs(logits).max())), (row, mine.output_ids[0], want.output_ids[0])
    assert all(r.passed for r in run_check(trt_model))


# ------------------------------------------- the TensorRT backend's checks, with a stand-in engine (no GPU)

class _Enum:
    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return isinstance(other, _Enum) and other.name == self.name

    __hash__ = object.__hash__


class _FakeTrt:
    class TensorIOMode:
        INPUT, OUTPUT = _Enum("INPUT"), _Enum("OUTPUT")

    class DataType:
        INT64, HALF, FLOAT, INT32 = _Enum("INT64"), _Enum("HALF"), _Enum("FLOAT"), _Enum("INT32")


class _FakeEngine:
    """What check_engine_io reads from an ICudaEngine: I/O names, modes, dtypes and profile shapes."""

    def __init__(self, spec, batch=4, prompt=64, context=128, profiles=2, change=None):
        from neodeploy.runtime.trt_backend import engine_contract

        self.io = {n: (getattr(_FakeTrt.TensorIOMode, m), getattr(_FakeTrt.DataType, d))
                   for n, (m, d) in engine_contract(spec).items()}
        if change:
            change(self.io)
        self.names = list(self.io)
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), profiles
        self.shapes = {("input_ids", 0): (batch, prompt), ("input_ids", 1): (batch, 1),
                       ("attention_mask", 0): (batch, prompt), ("attention_mask", 1): (batch, context)}

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name, profile):
        high = self.shapes[(name, profile)]
        return [(1,) * len(high), high, high]


def test_engine_io_is_checked_against_the_contract_and_limits_come_from_its_profiles():
    from neodeploy.core.errors import ArtifactError
    from neodeploy.runtime.trt_backend import check_engine_io

    spec = tiny_neox()
    assert check_engine_io(_FakeEngine(spec, batch=4, prompt=64, context=128), _FakeTrt, spec, "model.engine") == {
        "max_batch": 4, "max_prompt": 64, "max_context": 128}
    wrong = [
        (lambda io: io.pop("present.1.value"), "missing \\['present.1.value'\\]"),
        (lambda io: io.update({"extra": io["logits"]}), "unexpected \\['extra'\\]"),
        (lambda io: io.update({"input_ids": (_FakeTrt.TensorIOMode.INPUT, _FakeTrt.DataType.INT32)}),
         "input_ids is INPUT INT32, the artifact's contract is INPUT INT64"),
        (lambda io: io.update({"logits": (_FakeTrt.TensorIOMode.OUTPUT, _FakeTrt.DataType.HALF)}), "logits is OUTPUT HALF"),
    ]
    for change, match in wrong:
        with pytest.raises(ArtifactError, match=match):
            check_engine_io(_FakeEngine(spec, change=change), _FakeTrt, spec, "model.engine")
    with pytest.raises(ArtifactError, match="3 optimisation profiles"):
        check_engine_io(_FakeEngine(spec, profiles=3), _FakeTrt, spec, "model.engine")
    other = tiny_neox(num_layers=spec.num_layers + 1)  # an engine built from another export
    with pytest.raises(ArtifactError, match="another export"):
        check_engine_io(_FakeEngine(spec), _FakeTrt, other, "model.engine")


def test_a_missing_cuda_runtime_is_one_line_saying_what_to_install(monkeypatch):
    pytest.importorskip("polygraphy")
    from polygraphy import cuda

    from neodeploy.core.errors import UsageError
    from neodeploy.runtime.trt_backend import cuda_runtime

    def missing():
        raise OSError("libcudart.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cuda, "wrapper", missing)
    with pytest.raises(UsageError, match="libcudart.so.*pip install nvidia-cuda-runtime"):
        cuda_runtime()


def test_engine_is_streamed_hashed_and_published_with_the_old_artifact_kept(fp16_artifact, tmp_path, monkeypatch):
    import shutil

    import neodeploy.export.tensorrt as tensorrt_module
    from neodeploy.core.errors import ArtifactError
    from neodeploy.core.files import sha256
    from neodeploy.core.manifest import read_manifest, read_verified

    art = tmp_path / "art"
    shutil.copytree(fp16_artifact, art)
    inodes = {p.name: p.stat().st_ino for p in art.iterdir()}
    payload = bytes(range(256)) * 4099  # not a multiple of the chunk: the tail is written too
    info = {"file": "model.engine", "tensorrt_version": "10.15.1", "gpu": {"name": "test", "compute_capability": "9.0"},
            "build_seconds": 1.0}
    size, digest = tensorrt_module._write_engine(memoryview(payload), tmp_path / "direct.engine", chunk=1000)
    assert size == len(payload) and digest == sha256(tmp_path / "direct.engine")
    tensorrt_module.publish_engine(read_manifest(art), memoryview(payload), info, echo=lambda s: None)
    manifest = read_manifest(art)
    assert manifest.engine["sha256"] == manifest.files["model.engine"] == digest
    assert bytes(read_verified(manifest, "model.engine")) == payload
    # The other files were hard-linked, not copied, and are unchanged.
    assert all(art.joinpath(n).stat().st_ino == ino for n, ino in inodes.items() if n != "neodeploy.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "direct.engine"]
    # A failed write keeps the published engine and manifest, and leaves no work folder.
    before = {p.name: sha256(p) for p in art.iterdir()}

    def full(mem, path, chunk=0):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tensorrt_module, "_write_engine", full)
    with pytest.raises(ArtifactError, match="No space left on device.*unchanged"):
        tensorrt_module.publish_engine(read_manifest(art), memoryview(b"x"), info, echo=lambda s: None)
    assert {p.name: sha256(p) for p in art.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "direct.engine"]
    (art / "model.engine").write_bytes(payload[:-1])
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        read_verified(read_manifest(art), "model.engine")
