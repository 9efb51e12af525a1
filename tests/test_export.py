"""`neodeploy export`: the ONNX graph against the reference, the artifact contract, Optimum compatibility, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import cli, tiny_neo, tiny_neox
from neodeploy.core.errors import ExportError, UsageError, VerificationError
from neodeploy.core.files import sha256
from neodeploy.core.manifest import read_manifest
from neodeploy.core.tolerances import TOLERANCES
from neodeploy.export import export, verify

CONFIGS = {
    "gpt_neo-window4": tiny_neo(),
    "gpt_neox-rotary0.25-parallel": tiny_neox(),
    "gpt_neox-rotary1.0-sequential": tiny_neox(rotary_pct=1.0, parallel_residual=False, activation="gelu_fast"),
}
EXPORTS = [
    ("gpt_neo-window4", "fp32"),
    ("gpt_neo-window4", "fp16"),
    ("gpt_neox-rotary0.25-parallel", "fp32"),
    ("gpt_neox-rotary0.25-parallel", "fp16"),
    ("gpt_neox-rotary1.0-sequential", "fp32"),
]


@pytest.fixture(scope="module")
def artifacts(exported):
    return {(name, precision): exported(name, CONFIGS[name], precision) for name, precision in EXPORTS}


def _batch(vocab, lengths=(30, 22)):
    """A left-padded batch longer than the GPT-Neo window (4)."""
    g = np.random.default_rng(3)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = g.integers(0, vocab, n)
        mask[i, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("key", EXPORTS, ids=[f"{n}-{p}" for n, p in EXPORTS])
def test_onnxruntime_matches_reference_prefill_and_cached_decode(artifacts, key):
    from neodeploy.reference import load_checkpoint

    ckpt, art = artifacts[key]
    model = load_checkpoint(ckpt)
    session = verify.OnnxDecoder(art / "model.onnx", model.spec)
    precision = key[1]
    for lengths in ((30, 22), (9,)):  # batch 2 left-padded; batch 1 (a size the trace never saw)
        ids, mask = _batch(320, lengths)
        logits, cache = session(ids, mask, verify.position_ids(mask), session.empty_cache(len(lengths)))
        with torch.no_grad():
            ref, past = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(verify.position_ids(mask)))
        real = mask.astype(bool)
        scale = np.abs(ref.numpy()[real]).max()
        bound = 1e-4 if precision == "fp32" else 3e-2 * scale
        assert np.abs(logits - ref.numpy())[real].max() <= bound
        for _ in range(6):  # seq = 1 decode steps through the cache
            token = ref[:, -1].argmax(-1, keepdim=True)
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], 1)
            pos = verify.position_ids(mask)[:, -1:]
            logits, cache = session(token.numpy(), mask, pos, cache)
            with torch.no_grad():
                ref, past = model(token, torch.from_numpy(mask), torch.from_numpy(pos), past)
            assert np.abs(logits - ref.numpy()).max() <= bound
        assert cache[0].shape == (len(lengths), 4, mask.shape[1], 16)
        assert cache[0].dtype == (np.float16 if precision == "fp16" else np.float32)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("family", ["gpt_neo-window4", "gpt_neox-rotary0.25-parallel"])
def test_graph_contract_and_fp32_islands(artifacts, family):
    fp32 = onnx.load(str(artifacts[(family, "fp32")][1] / "model.onnx"), load_external_data=False)
    fp16 = onnx.load(str(artifacts[(family, "fp16")][1] / "model.onnx"), load_external_data=False)
    for model in (fp32, fp16):
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"If", "Loop", "Scan"}
        assert [i.name for i in model.graph.input][:4] == ["input_ids", "attention_mask", "position_ids",
                                                           "past_key_values.0.key"]
        assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
        dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
        assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert model.ir_version <= 10 and model.opset_import[0].version >= 17
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if len(t.dims) == 2)
    types = _value_types(fp16)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    islands = [n for n in fp16.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(islands) >= 2 * 2 + 1  # two per layer and the final norm at least
    assert all(types[n.input[0]] == f32 and types[n.output[0]] == f32 for n in islands)
    matmuls = [n for n in fp16.graph.node if n.op_type == "MatMul"]
    assert sum(types.get(n.output[0]) == f16 for n in matmuls) >= 4  # projections really run in fp16
    if family.startswith("gpt_neo-"):
        # GPT-Neo's unscaled q·kᵀ: the MatMul feeding the softmax must be fp32.
        producers = {o: n for n in fp16.graph.node for o in n.output}

        def data_input(node):  # Where(condition, x, y): the data is x
            return producers[node.input[1 if node.op_type == "Where" else 0]]

        qk = [data_input(n) for n in islands if n.op_type == "Softmax"]
        while any(p.op_type != "MatMul" for p in qk):
            qk = [p if p.op_type == "MatMul" else data_input(p) for p in qk]
        assert all(types[p.output[0]] == f32 for p in qk)


def test_artifact_folder_manifest_and_golden(artifacts):
    ckpt, art = artifacts[("gpt_neox-rotary0.25-parallel", "fp32")]
    names = sorted(p.name for p in art.iterdir())
    assert names == ["config.json", "golden.npz", "model.onnx", "model.onnx.data", "neodeploy.json",
                     "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((art / "neodeploy.json").read_text())
    assert manifest["format_version"] == 2 and manifest["dtype"] == "fp32" and "quantization" not in manifest
    assert manifest["files"] == {n: sha256(art / n) for n in names if n != "neodeploy.json"}
    assert {"torch", "onnx", "onnxruntime", "onnxslim"} <= set(manifest["versions"])
    assert manifest["max_context"] == 128 and manifest["onnx"]["opset"] == 18
    assert not list(art.parent.glob(".*.tmp"))
    # golden.npz round-trips: replaying it in onnxruntime reproduces the stored greedy tokens and logits.
    from neodeploy.reference import ModelSpec

    spec = ModelSpec.from_dict(manifest["spec"])
    decoder = verify.OnnxDecoder(art / "model.onnx", spec)
    cases = verify.load_golden(art / "golden.npz")
    assert [c.name for c in cases] == ["short", "long", "padded-x3"]
    assert cases[2].input_ids.shape[0] == 3 and (cases[2].attention_mask == 0).any()
    assert cases[1].input_ids.shape[1] == 128 - verify.DECODE_STEPS  # long prompt clipped to the context
    for case in cases:
        mask = case.attention_mask
        logits, cache = decoder(case.input_ids, mask, verify.position_ids(mask), decoder.empty_cache(len(mask)))
        assert np.abs(logits[:, -1] - case.step_logits[:, 0]).max() <= 1e-4
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(case.tokens.shape[1] - 1):
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], 1)
            logits, cache = decoder(tokens[-1][:, None], mask, verify.position_ids(mask)[:, -1:], cache)
            tokens.append(logits[:, -1].argmax(-1))
        np.testing.assert_array_equal(np.stack(tokens, 1), case.tokens)


@pytest.mark.parametrize("key", [("gpt_neo-window4", "fp32"), ("gpt_neox-rotary0.25-parallel", "fp32")],
                         ids=["gpt_neo", "gpt_neox"])
def test_optimum_loads_the_folder_and_greedy_matches(artifacts, key):
    optimum_ort = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    from neodeploy.reference import load_checkpoint
    from neodeploy.reference.generate import greedy_generate

    ckpt, art = artifacts[key]
    model = optimum_ort.ORTModelForCausalLM.from_pretrained(art, use_cache=True, use_io_binding=False)
    prompt = [5, 17, 33, 2, 250, 9, 100, 64, 3, 7]
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = greedy_generate(load_checkpoint(ckpt), prompt, 12)
    assert out[0, len(prompt):].tolist() == ours.output_ids


def test_verification_failure_publishes_nothing(artifacts, tmp_path, monkeypatch):
    ckpt, _ = artifacts[("gpt_neox-rotary0.25-parallel", "fp32")]
    monkeypatch.setitem(TOLERANCES, "fp32", dataclasses.replace(TOLERANCES["fp32"], max_rel_error=0.0))
    with pytest.raises(VerificationError, match="verification failed on case 'short'"):
        export(ckpt, tmp_path / "out", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing_and_keeps_the_old_folder(artifacts, tmp_path, monkeypatch):
    from neodeploy.export import graph

    ckpt, _ = artifacts[("gpt_neox-rotary0.25-parallel", "fp32")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old artifact")

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "clean", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, out, overwrite=True, echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "previous.txt").read_text() == "old artifact"


def test_bad_requests_fail_before_any_work(artifacts, tmp_path):
    ckpt, _ = artifacts[("gpt_neo-window4", "fp32")]
    cases = [
        (dict(precision="int8"), UsageError, "precision 'int8' is not supported"),
        (dict(opset=12), UsageError, "opset 12 is not supported"),
        (dict(max_context=4096), UsageError, "exceeds the 128 learned positions"),
        (dict(max_context=8), UsageError, "too small"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            export(ckpt, tmp_path / "out", echo=lambda s: None, **kwargs)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(ckpt, tmp_path / "exists", echo=lambda s: None)
    with pytest.raises(ExportError, match="cannot write"):
        export(ckpt, "/proc/neodeploy-artifact", echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_cli_export_errors_exit_2(tmp_path):
    from neodeploy.reference import make_checkpoint

    ckpt = make_checkpoint(tiny_neo(), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    for args, message in (
        ((ckpt, tmp_path / "a", "--precision", "bf16"), "precision 'bf16'"),
        ((ckpt, tmp_path / "b", "--opset", "9"), "opset 9"),
        ((ckpt, tmp_path / "c", "--max-context", "5000"), "learned positions"),
        ((ckpt, tmp_path / "f", "--logits", "first"), "--logits 'first' is not supported"),
        ((ckpt, tmp_path / "g", "--target", "cpu", "--logits", "all"), "--target cpu returns last-position logits only"),
        ((ckpt, ckpt), "already exists"),
        ((tmp_path / "missing", tmp_path / "d"), "does not exist"),
    ):
        proc = cli("export", *args, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                                                  "model_type": "gpt_neox", "num_hidden_layers": 2,
                                                  "num_attention_heads": 4}))
    proc = cli("export", ckpt, tmp_path / "e", timeout=120)
    assert proc.returncode == 2 and "'dynamic'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_out_dir_containing_the_checkpoint_is_refused(tmp_path):
    from neodeploy.reference import make_checkpoint

    (tmp_path / "work").mkdir()
    ckpt = make_checkpoint(tiny_neox(), tmp_path / "work" / "ckpt")
    with pytest.raises(ExportError, match="contains the checkpoint"):
        export(ckpt, tmp_path / "work", overwrite=True, echo=lambda s: None)
    assert (ckpt / "model.safetensors").is_file()


def test_int8_quantises_a_tied_lm_head(tmp_path):
    """GPT-Neo's lm_head reaches its MatMul through Transpose(wte); it must be quantised like every projection."""
    from neodeploy.reference import make_checkpoint

    ckpt = make_checkpoint(tiny_neo(), tmp_path / "ckpt", init_std=0.1)
    art = export(ckpt, tmp_path / "int8", quantize="int8", echo=lambda s: None)
    manifest = json.loads((art / "neodeploy.json").read_text())
    assert manifest["quantization"]["quantized_matmuls"] == 3 * 6 + 1  # q, k, v, out, fc, proj per layer + lm_head
    typed = read_manifest(art)
    assert (typed.quantization.method, typed.precision, typed.dtype) == ("int8", "int8", "fp32")
    assert typed.quantization.ops.startswith("MatMul ->")
    assert typed.fields()["quantization"] == manifest["quantization"]  # an updated copy keeps the whole section
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0].endswith("lm_head.weight")]


def test_reference_stage_is_reused_only_for_the_same_checkpoint(tmp_path, monkeypatch, make):
    from safetensors.numpy import load_file, save_file

    monkeypatch.setenv("NEODEPLOY_CACHE", str(tmp_path / "cache"))
    ckpt = make(tiny_neox(), "ck")
    first, second, third = [], [], []
    a = export(ckpt, tmp_path / "a", echo=first.append)
    b = export(ckpt, tmp_path / "b", target="cpu", echo=second.append)
    assert not any("reference reused from" in line for line in first), first
    assert any("reference reused from" in line for line in second), second
    with np.load(a / "golden.npz") as ga, np.load(b / "golden.npz") as gb:
        for name in ga["cases"].tolist():
            np.testing.assert_array_equal(ga[f"{name}/tokens"], gb[f"{name}/tokens"])
            np.testing.assert_array_equal(ga[f"{name}/topk_logits"], gb[f"{name}/topk_logits"])
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in weights if k.endswith("dense_4h_to_h.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    c = export(ckpt, tmp_path / "c", echo=third.append)
    assert not any("reference reused from" in line for line in third)  # a changed weight is a new key
    with np.load(a / "golden.npz") as ga, np.load(c / "golden.npz") as gc:
        assert not np.array_equal(ga["short/topk_logits"], gc["short/topk_logits"])
