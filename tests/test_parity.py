"""The reference against transformers' eager implementation (fp32): max abs logit difference <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_load, tiny_neo, tiny_neox

TOL = 1e-4
NEOX_CASES = {
    "rotary0.25-parallel-gelu": dict(rotary_pct=0.25, parallel_residual=True, activation="gelu"),
    "rotary1.0-sequential-gelu_fast": dict(rotary_pct=1.0, parallel_residual=False, activation="gelu_fast"),
    "linear-rope-x2": dict(rope_scaling_type="linear", rope_scaling_factor=2.0),
    "no-attention-bias-tied": dict(attention_bias=False, tied_embeddings=True),
}
NEO_CASES = {
    "global-local-window4": dict(),
    "local-global-local": dict(attention_layers=("local", "global", "local")),
    "gelu_new-window7": dict(window_size=7),
}


def _batch(vocab: int, length: int = 24):
    """A batch of 3 with left padding (0, 5 and 11 pads) and the positions generation would use."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def _compare(ours, hf, vocab):
    ids, mask, pos = _batch(vocab)
    with torch.no_grad():
        a, present = ours(ids, attention_mask=mask, position_ids=pos)
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    err = (a - b).abs()[real].max().item()
    assert a.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert err <= TOL, f"max abs logit difference {err:.2e} > {TOL}"
    spec = ours.spec
    assert len(present) == spec.num_layers
    assert present[0][0].shape == (3, spec.num_heads, 24, spec.head_dim)


@pytest.mark.parametrize("case", NEOX_CASES)
def test_gpt_neox_matches_transformers(case, make):
    from neodeploy.reference import load_checkpoint

    path = make(tiny_neox(**NEOX_CASES[case]))
    _compare(load_checkpoint(path), hf_load(path), 320)


@pytest.mark.parametrize("case", NEO_CASES)
def test_gpt_neo_matches_transformers(case, make):
    from neodeploy.reference import load_checkpoint

    path = make(tiny_neo(**NEO_CASES[case]))
    _compare(load_checkpoint(path), hf_load(path), 320)


@pytest.mark.parametrize("spec", [tiny_neo(), tiny_neox(rope_scaling_type="linear", rope_scaling_factor=2.0)],
                         ids=["window", "linear-rope"])
def test_parity_is_sensitive_to_window_and_scaling(spec, make):
    """The comparison above would catch an ignored window or rope scaling: dropping either moves the logits."""
    from neodeploy.reference import build_model, load_checkpoint

    path = make(spec)
    ours = load_checkpoint(path)
    wrong_spec = spec.replace(window_size=10_000) if spec.family == "gpt_neo" else spec.replace(rope_scaling_type=None, rope_scaling_factor=1.0)
    wrong = build_model(wrong_spec)
    wrong.load_state_dict(ours.state_dict())
    ids, mask, pos = _batch(320)
    with torch.no_grad():
        diff = (wrong.eval()(ids, mask, pos)[0] - hf_load(path)(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    assert diff.abs()[mask.bool()].max() > 100 * TOL


@pytest.mark.parametrize("spec", [tiny_neo(), tiny_neox(), tiny_neox(rotary_pct=1.0, parallel_residual=False)],
                         ids=["gpt_neo", "gpt_neox", "gpt_neox-seq"])
def test_prefill_then_cached_steps_equal_full_sequence(spec, make):
    """Prefill 16 tokens then 8 single-token steps through the cache == one pass over all 24 (and transformers)."""
    from neodeploy.reference import load_checkpoint

    path = make(spec)
    model = load_checkpoint(path)
    ids, mask, pos = _batch(320)
    with torch.no_grad():
        full, _ = model(ids, attention_mask=mask, position_ids=pos)
        oracle = hf_load(path)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        steps = [model(ids[:, :16], attention_mask=mask[:, :16], position_ids=pos[:, :16])]
        for t in range(16, 24):
            past = steps[-1][1]
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                               past_key_values=past))
    cached = torch.cat([s[0] for s in steps], dim=1)
    real = mask.bool()
    assert (cached - full).abs()[real].max() <= TOL
    assert (cached - oracle).abs()[real].max() <= TOL
    assert steps[-1][1][0][0].shape[2] == 24


def test_default_positions_follow_the_mask(make):
    """Without position_ids the reference counts real tokens, so a left-padded row equals the row alone."""
    from neodeploy.reference import load_checkpoint

    model = load_checkpoint(make(tiny_neox()))
    ids, mask, _ = _batch(320)
    with torch.no_grad():
        batched, _ = model(ids, attention_mask=mask)
        alone, _ = model(ids[2:, 11:])
    assert (batched[2, 11:] - alone[0]).abs().max() <= TOL


class _Flat(torch.nn.Module):
    """The reference with flat (key, value, key, value, ...) cache arguments, as an exporter sees it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, pos, *kv):
        pairs = [(kv[k], kv[k + 1]) for k in range(0, len(kv), 2)]
        logits, present = self.model(ids, mask, pos, pairs)
        return logits, *[t for pair in present for t in pair]


@pytest.mark.parametrize("spec", [tiny_neo(), tiny_neox()], ids=["gpt_neo", "gpt_neox"])
def test_reference_exports_with_dynamic_shapes(spec, make):
    """torch.export captures one graph (no branching on values) that stays exact at other batch/seq/past sizes."""
    from torch.export import Dim

    from neodeploy.reference import load_checkpoint

    model = _Flat(load_checkpoint(make(spec)))
    ids, mask, pos = _batch(320)
    with torch.no_grad():
        past = model(ids[:, :10], mask[:, :10], pos[:, :10])[1:]
        auto = Dim.AUTO
        kv_dims = tuple((auto, Dim.STATIC, auto, Dim.STATIC) for _ in past)
        program = torch.export.export(
            model, (ids[:, 10:12], mask[:, :12], pos[:, 10:12], *past),
            dynamic_shapes=((auto, auto), (auto, auto), (auto, auto), kv_dims), strict=False,
        )
        # Different batch (2), seq (3) and past (14) from the example used to capture it.
        past14 = [t[1:] for t in model(ids[:, :14], mask[:, :14], pos[:, :14])[1:]]
        args = (ids[1:, 14:17], mask[1:, :17], pos[1:, 14:17], *past14)
        got, want = program.module()(*args)[0], model(*args)[0]
    assert got.shape == (2, 3, 320)
    assert (got - want).abs().max() <= TOL
