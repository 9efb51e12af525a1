"""The CPU target's fused attention (neodeploy::attention -> GroupQueryAttention) and its in-place KV cache."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from conftest import plain_and_fused, tiny_neo, tiny_neox
from neodeploy.export import export
from neodeploy.export.graph import input_names
from neodeploy.reference import load_checkpoint, make_checkpoint
from neodeploy.reference.generate import greedy_generate
from neodeploy.runtime import load
from neodeploy.runtime.backend import InPlaceCache
from neodeploy.runtime.model import left_pad, position_ids

PROMPTS = [[5, 17, 33, 2, 250, 9, 100, 64, 3, 7, 11], [42, 8], [300, 1, 2, 3, 4, 5]]
# head_dim 16 with rotary_pct 0.25 gives a 2-wide table, which onnxruntime's kernel refuses: rotary stays in the
# graph. head_dim 64 (Pythia's) gives 8: rotary runs inside GroupQueryAttention. GPT-Neo has no rotary.
SPECS = {
    "neox-rotary-in-graph": lambda: tiny_neox(),
    "neox-rotary-in-kernel": lambda: tiny_neox(hidden_size=128, num_heads=2),
    # An 8-wide table but 24-wide heads: the kernel rotates only heads of a multiple of 16, so rotary stays in the
    # graph (the export crashed in verify when it went to the kernel).
    "neox-head-24-rotary-16": lambda: tiny_neox(hidden_size=72, num_heads=3, rotary_pct=0.6667),
    "neo": lambda: tiny_neo(),
}


@pytest.fixture(scope="module")
def cpu_artifacts(exported):
    """Shared with the engine tests (one export per session)."""
    return lambda name: exported(f"cpu-{name}", SPECS[name](), target="cpu")


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_op_in_eager_mode_equals_the_reference(name):
    """The op's own math (bias instead of a boolean mask, rotary at the cache index) against the reference, on a
    left-padded batch with a cache: what GroupQueryAttention is then verified against at export."""
    spec = SPECS[name]()
    plain, fused = plain_and_fused(spec)
    ids, mask = left_pad(PROMPTS, 0)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    pos = torch.from_numpy(position_ids(mask.numpy()))
    empty = [(torch.zeros(3, spec.num_heads, 0, spec.head_dim),) * 2 for _ in range(spec.num_layers)]
    with torch.inference_mode():
        want, want_past = plain(ids, mask, pos, empty)
        got, got_past = fused(ids, mask, pos, empty)
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-4)  # pad queries attend differently; nobody reads them
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step_pos = torch.from_numpy(position_ids(step_mask.numpy())[:, -1:])
        token = want[:, -1].argmax(-1, keepdim=True)
        want_step, _ = plain(token, step_mask, step_pos, want_past)
        got_step, _ = fused(token, step_mask, step_pos, got_past)
    assert torch.allclose(got_step, want_step, atol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_cpu_export_runs_group_query_attention_and_generates_like_the_reference(cpu_artifacts, name):
    ckpt, art = cpu_artifacts(name)
    manifest = json.loads((art / "neodeploy.json").read_text())
    spec = SPECS[name]()
    assert manifest["onnx"]["kv_cache"] == "in-place"
    # One bound: check's logit scale is the one the export judged (the last position only, on this graph).
    with np.load(art / "golden.npz") as golden:
        for case in manifest["verification"]["cases"]:
            assert float(golden[f"{case['name']}/scale"]) == pytest.approx(case["scale"], rel=1e-6)
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == spec.num_layers and ops["Softmax"] == 0
    # position_ids stays even where nothing reads it; num_logits: the last position, or the last n (speculation)
    assert [i.name for i in graph.input] == [*input_names(spec), "num_logits"] and manifest["onnx"]["logits"] == "tail"
    rotary_in_kernel = [a.i for n in graph.node if n.op_type == "GroupQueryAttention"
                        for a in n.attribute if a.name == "do_rotary"]
    assert rotary_in_kernel == [int(name == "neox-rotary-in-kernel")] * spec.num_layers
    # Where rotary is in the kernel (and for GPT-Neo, which has none) one packed [q | k | v] projection feeds
    # each kernel: no key / value inputs, no Split; rotary in the graph needs q and k apart.
    packed = name in ("neox-rotary-in-kernel", "neo")
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all((n.input[1] == n.input[2] == "") == packed for n in attention)
    assert (ops["Split"] == 0) == packed
    assert ops["MatMul"] == spec.num_layers * 4 + 1  # q, k and v in one MatMul per layer, for both families

    model, reference = load(art), load_checkpoint(ckpt)
    assert model.backend.in_place
    batch = model.generate(PROMPTS, max_new_tokens=12)
    for prompt, result in zip(PROMPTS, batch):
        want = greedy_generate(reference, prompt, 12, eos_token_id=model.eos_token_id).output_ids
        assert result.output_ids == [t for t in want if t != model.eos_token_id]


@pytest.mark.parametrize("name", ["neox-rotary-in-kernel", "neo"])
def test_in_place_cache_is_written_by_the_kernel_and_grows(cpu_artifacts, name):
    ckpt, art = cpu_artifacts(name)
    model, reference = load(art), load_checkpoint(ckpt)
    prompt = PROMPTS[0]
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    # capacity 12 < prompt + 6 steps: the cache must grow once, keeping what it holds.
    logits, state = model.backend.prefill(ids, mask, position_ids(mask), capacity=12)
    assert isinstance(state, InPlaceCache) and state.capacity == 12
    buffer = state.arrays[0]
    tokens = [int(logits[0].argmax())]
    for step in range(6):
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        logits, next_state = model.backend.decode(np.array([[tokens[-1]]]), mask, position_ids(mask)[:, -1:], state)
        assert next_state is state
        if mask.shape[1] <= 12:
            assert state.arrays[0] is buffer  # decode allocated no new cache
        tokens.append(int(logits[0].argmax()))
    assert state.capacity >= mask.shape[1] > 12
    with torch.inference_mode():
        _, past = reference(torch.tensor([prompt + tokens[:-1]]))
    total = mask.shape[1]
    # The keys and values the kernel wrote into our buffers are the reference's cache (batch 1: cache index
    # = position, so rotary agrees exactly).
    for layer in range(len(past)):
        np.testing.assert_allclose(state.arrays[2 * layer][:, :, :total], past[layer][0].numpy(), atol=1e-4)
        np.testing.assert_allclose(state.arrays[2 * layer + 1][:, :, :total], past[layer][1].numpy(), atol=1e-4)
    want = greedy_generate(reference, prompt, 7, eos_token_id=None).output_ids
    assert tokens == want


def test_fp16_cpu_export_keeps_plain_attention(tmp_path):
    ckpt = make_checkpoint(tiny_neox(), tmp_path / "ckpt", seed=3, init_std=0.1)
    art = export(ckpt, tmp_path / "cpu16", target="cpu", precision="fp16", echo=lambda s: None)
    manifest = json.loads((art / "neodeploy.json").read_text())
    assert manifest["onnx"]["kv_cache"] == "concatenated"  # the fused CPU attention is fp32 only
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    assert not load(art).backend.in_place
