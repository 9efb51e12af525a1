"""--target cuda: fp16 GroupQueryAttention without attention_bias over left-aligned rows (reference/lengths.py,
export/attention.py, export/cuda.py, runtime/aligned.py). The CPU runs everything but the speed: onnxruntime's CPU
GroupQueryAttention kernel takes the same graph, and the runtime's pool binds the same way on either provider."""

from __future__ import annotations

import base64
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import plain_and_fused, tiny_neo, tiny_neox
from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.export import export
from neodeploy.export.cuda import copy_rows_graph
from neodeploy.runtime import load
from neodeploy.runtime.aligned import COPY_ROWS_GRAPH, AlignedBatch, align_left, lengths_mask
from neodeploy.runtime.engine import Engine, EngineConfig
from neodeploy.runtime.model import left_pad, position_ids
from neodeploy.runtime.sampling import SamplingParams

CPU = ["CPUExecutionProvider"]
PROMPTS = [[5, 17, 33, 2, 250, 9, 100, 64, 3, 7, 11], [42, 8], [300, 1, 2, 3, 4, 5]]
# GPT-Neo (unscaled, local windows of 4), GPT-NeoX with rotary in the kernel (head 64) and in the graph (head 16).
SPECS = {
    "neo": lambda: tiny_neo(),
    "neox-rotary-in-kernel": lambda: tiny_neox(hidden_size=128, num_heads=2),
    "neox-rotary-in-graph": lambda: tiny_neox(),
}
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def artifacts(exported):
    """name -> (checkpoint, cuda artifact, portable fp16 artifact of the same checkpoint)."""
    def get(name):
        ckpt, cuda = exported(f"cuda-{name}", SPECS[name](), precision="fp16", target="cuda")
        return ckpt, cuda, exported(f"cuda-{name}", SPECS[name](), precision="fp16")[1]
    return get


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lengths_op_in_eager_mode_equals_the_reference(name, dtype):
    """The kernel's contract in PyTorch, fed right-padded rows, against the reference fed left-padded ones: prefill
    of a padded batch, then decode steps writing each row's token at its own length."""
    spec = SPECS[name]()
    plain, fused = plain_and_fused(spec, dtype, by_lengths=True)
    ids, mask = left_pad(PROMPTS, 0)
    right_ids, right_mask = align_left(ids, mask)
    lengths = mask.sum(1)
    empty = [(torch.zeros(3, spec.num_heads, 0, spec.head_dim, dtype=dtype),) * 2 for _ in range(spec.num_layers)]
    t = torch.from_numpy
    with torch.inference_mode():
        want, want_past = plain(t(ids), t(mask), t(position_ids(mask)), empty)
        got, got_past = fused(t(right_ids), t(right_mask), t(position_ids(right_mask)), empty)
        errors = [float((got[b, n - 1] - want[b, -1]).abs().max()) for b, n in enumerate(lengths)]
        for _ in range(5):
            token = want[:, -1].argmax(-1, keepdim=True)
            mask, lengths = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), lengths + 1
            want, want_past = plain(token, t(mask), t(position_ids(mask)[:, -1:]), want_past)
            got, got_past = fused(token, t(lengths_mask(lengths)), t((lengths - 1)[:, None]), got_past)
            errors.append(float((got[:, -1] - want[:, -1]).abs().max()))
    assert max(errors) <= (1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_graph_is_fp16_group_query_attention_without_bias(artifacts, name):
    _, art, _ = artifacts(name)
    spec = SPECS[name]()
    manifest = json.loads((art / "neodeploy.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["onnx"]["target"] == "cuda"
    assert manifest["onnx"]["logits"] == "last" and manifest["onnx"]["kv_cache"] == "in-place"
    assert manifest["onnx"]["rotary"] == ("kernel" if name == "neox-rotary-in-kernel" else "graph")
    assert all(case["greedy_agree"] == case["greedy_total"] for case in manifest["verification"]["cases"])
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == spec.num_layers and ops["Softmax"] == 0 and ops["GatherElements"] == 1
    assert "num_logits" not in [i.name for i in graph.input]
    windows = {"global": -1, "local": spec.window_size} if spec.family == "gpt_neo" else {"global": -1}
    kinds = spec.attention_layers if spec.family == "gpt_neo" else ["global"] * spec.num_layers
    for node, kind in zip([n for n in graph.node if n.op_type == "GroupQueryAttention"], kinds):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert len(node.input) <= 10 or node.input[10] == ""  # no attention_bias: the CUDA kernel refuses one
        assert attrs["local_window_size"] == windows[kind]  # onnxruntime >= 1.23 counts the query itself
        assert attrs["scale"] == pytest.approx(1.0 if spec.family == "gpt_neo" else spec.head_dim ** -0.5)
        assert attrs["do_rotary"] == int(name == "neox-rotary-in-kernel")
        assert node.input[1] == node.input[2] == "" or name == "neox-rotary-in-graph"  # packed QKV where it can
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("name", list(SPECS))
def test_runtime_on_cpu_generates_as_the_portable_export(artifacts, name):
    """Left-padded golden batches become right-padded rows; generation equals the portable fp16 artifact's, alone
    and batched, and through an engine whose rows join and leave its pool (3 requests, 2 slots)."""
    _, art, portable = artifacts(name)
    model, want_model = load(art, providers=CPU), load(portable)
    assert model.backend.aligned and model.backend.in_place and not model.backend.verifies
    want = [g.output_ids for g in want_model.generate(PROMPTS, max_new_tokens=12)]
    assert [g.output_ids for g in model.generate(PROMPTS, max_new_tokens=12)] == want
    assert [model.generate(p, max_new_tokens=12)[0].output_ids for p in PROMPTS] == want
    engine = Engine(model, EngineConfig(max_running=2, prefix_cache=0))
    try:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in PROMPTS]
        assert [h.result().output_ids for h in handles] == want
    finally:
        engine.close()


def test_rows_move_whole_in_the_pool(artifacts):
    """join copies a row to its slot at the same cache indices, keep moves rows down; nothing shifts columns."""
    _, art, _ = artifacts("neox-rotary-in-kernel")
    model = load(art, providers=CPU)
    pool = AlignedBatch(model.backend, rows=3, capacity=32)
    assert type(pool) is AlignedBatch
    from neodeploy.runtime.batch import DecodeBatch

    alone = []
    for prompt in PROMPTS:
        one = DecodeBatch(model.backend)
        assert isinstance(one, AlignedBatch)
        one.prefill([prompt], 0, capacity=len(prompt) + 1)
        alone.append([a.copy() for a in model.backend.cache_arrays(one.state, 1, len(prompt))])
        pool.join(one)
    assert pool.lengths.tolist() == [len(p) for p in PROMPTS] and (pool.mask == lengths_mask(pool.lengths)).all()
    arrays = model.backend.cache_arrays(pool.state, 3, pool.width)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(arrays[0][row, :, : len(prompt)], alone[row][0][0])
    pool.keep([0, 2])
    arrays = model.backend.cache_arrays(pool.state, 2, pool.width)
    np.testing.assert_array_equal(arrays[0][1, :, : len(PROMPTS[2])], alone[2][0][0])
    assert pool.width == len(PROMPTS[0]) and pool.lengths.tolist() == [len(PROMPTS[0]), len(PROMPTS[2])]


def test_copy_graph_bytes_are_the_exports(tmp_path):
    for dtype in ("float16", "float32"):
        assert base64.b64decode(COPY_ROWS_GRAPH[dtype]) == copy_rows_graph(np.dtype(dtype))


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDAExecutionProvider: the refusal does not apply")
def test_load_without_cuda_refuses_in_one_line(artifacts):
    _, art, _ = artifacts("neo")
    with pytest.raises(ArtifactError, match="--target cuda export.*CUDA machine.*--target portable") as info:
        load(art)
    assert "\n" not in str(info.value)


def test_cuda_target_request_errors(tmp_path, make):
    ckpt = make(tiny_neo())
    with pytest.raises(UsageError, match="--precision fp16"):
        export(ckpt, tmp_path / "a", target="cuda", echo=lambda s: None)
    with pytest.raises(UsageError, match="last-position"):
        export(ckpt, tmp_path / "b", target="cuda", precision="fp16", logits="all", echo=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU")
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_provider_generates_as_the_cpu_kernel(artifacts, name):
    _, art, _ = artifacts(name)
    gpu, cpu = load(art), load(art, providers=CPU)
    assert gpu.backend.device == "cuda"
    assert [g.output_ids for g in gpu.generate(PROMPTS, max_new_tokens=12)] == \
        [g.output_ids for g in cpu.generate(PROMPTS, max_new_tokens=12)]
