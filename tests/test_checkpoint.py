"""Loading checkpoints in every layout Hugging Face writes, and refusing every bad one with a named reason."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_load, tiny_neo, tiny_neox
from neodeploy.core.errors import CheckpointError, ConfigError, UsageError
from neodeploy.reference import load_checkpoint

IDS = torch.tensor([[5, 17, 33, 2, 250, 9, 100, 64, 3, 7, 11, 200]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)[0]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_safetensors_equal_single_file(make):
    single = make(tiny_neox(), "single", seed=3)
    sharded = make(tiny_neox(), "sharded", seed=3, max_shard_bytes=60_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert _same_weights(load_checkpoint(single), load_checkpoint(sharded))
    assert (_logits(load_checkpoint(sharded)) - hf_load(sharded)(IDS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("shard_bytes", [2**31, 60_000], ids=["single", "sharded"])
def test_pytorch_bin_loads_with_weights_only(make, shard_bytes):
    st = make(tiny_neo(), "st", seed=4)
    binary = make(tiny_neo(), "bin", seed=4, file_format="bin", max_shard_bytes=shard_bytes)
    assert not list(binary.glob("*.safetensors"))
    assert _same_weights(load_checkpoint(st), load_checkpoint(binary))
    assert (_logits(load_checkpoint(binary)) - hf_load(binary)(IDS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_files_cast_or_kept(make, dtype):
    path = make(tiny_neox(), dtype=str(dtype).split(".")[1])
    assert next(iter(load_file(path / "model.safetensors").values())).dtype == dtype
    cast = load_checkpoint(path)  # default: fp32
    kept = load_checkpoint(path, dtype="auto")
    assert cast.gpt_neox.embed_in.weight.dtype == torch.float32
    assert kept.gpt_neox.embed_in.weight.dtype == dtype
    assert torch.equal(kept.gpt_neox.embed_in.weight.float(), cast.gpt_neox.embed_in.weight)
    # fp32 compute on fp16 weights is exactly what transformers does when asked for fp32.
    assert (_logits(cast) - hf_load(path, torch.float32)(IDS).logits).abs().max() <= 1e-4
    low = _logits(kept)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - _logits(cast)).abs().max() < 0.1 * _logits(cast).abs().max()


def test_tied_lm_head_absent_and_v5_saved_names(make, tmp_path):
    neo_path = make(tiny_neo())
    assert "lm_head.weight" not in load_file(neo_path / "model.safetensors")
    neo = load_checkpoint(neo_path)
    assert neo.lm_head.weight is neo.transformer.wte.weight
    # Whatever the installed transformers writes (v5 renames GPT-NeoX's embed_out to lm_head) loads back exactly.
    for spec, name in ((tiny_neo(), "neo"), (tiny_neox(), "neox")):
        hf = hf_load(make(spec, name + "-src"))
        hf.save_pretrained(tmp_path / name)
        assert (_logits(load_checkpoint(tmp_path / name)) - hf(IDS).logits).abs().max() <= 1e-4


def test_legacy_buffers_are_ignored(make):
    for spec, extra in (
        (tiny_neo(), ["transformer.h.0.attn.attention.bias", "transformer.h.1.attn.attention.masked_bias"]),
        (tiny_neox(), ["gpt_neox.layers.0.attention.bias", "gpt_neox.layers.0.attention.masked_bias",
                       "gpt_neox.layers.1.attention.rotary_emb.inv_freq"]),
    ):
        path = make(spec, spec.family)
        reference = _logits(load_checkpoint(path))
        tensors = load_file(path / "model.safetensors")
        tensors.update({name: torch.ones(4, 4) for name in extra})
        save_file(tensors, path / "model.safetensors")
        assert torch.equal(_logits(load_checkpoint(path)), reference)


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_unexpected_and_misshaped_tensors_are_named(make):
    path = make(tiny_neox())
    _rewrite(path, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match=r"'gpt_neox.layers.1.mlp.dense_4h_to_h.bias' is missing"):
        load_checkpoint(path)

    path = make(tiny_neox(), "extra")
    _rewrite(path, lambda t: t.update({"gpt_neox.layers.2.mlp.dense_4h_to_h.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'gpt_neox.layers.2.mlp.dense_4h_to_h.bias'"):
        load_checkpoint(path)

    # Architecture mismatch: the config says intermediate 128, the weights were made with 256.
    path = make(tiny_neox(intermediate_size=256), "shape")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"'gpt_neox.layers.0.mlp.dense_4h_to_h.weight' has shape \[64, 256\] "
                                              r"but config.json implies \[64, 128\]"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_non_tensors_or_code_is_refused(make, capsys):
    path = make(tiny_neox(), file_format="bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "training_step": 5}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="non-tensor object under 'training_step'"):
        load_checkpoint(path)
    torch.save({**state, "payload": _Exploit()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_truncated_or_broken_files(make):
    path = make(tiny_neox())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)

    sharded = make(tiny_neox(), "sharded", max_shard_bytes=60_000)
    next(iter(sorted(sharded.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json is missing"):
        load_checkpoint(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["gpt_neox.embed_in.weight"] = "../outside.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_checkpoint(sharded)

    empty = make(tiny_neox(), "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(empty)


def test_code_checkpoints_and_bad_configs_are_refused(make):
    path = make(tiny_neox())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(ConfigError, match="never executes"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        load_checkpoint(path)
    with pytest.raises(UsageError, match="dtype 'int8'"):
        load_checkpoint(path, dtype="int8")


def test_make_checkpoint_is_atomic_and_does_not_overwrite(make, tmp_path):
    path = make(tiny_neox(), seed=1)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        make(tiny_neox(), seed=2)
    assert (path / "model.safetensors").read_bytes() == before
    make(tiny_neox(), seed=2, overwrite=True)
    assert (path / "model.safetensors").read_bytes() != before
    with pytest.raises(Exception):
        make(tiny_neox(), "bad", tokenizer_dir=tmp_path / "no-such-tokenizer")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
