"""ModelSpec: presets, v4/v5 config spellings, refusals of maths we would otherwise ignore."""

from __future__ import annotations

import json

import pytest

from neodeploy.core.errors import ConfigError
from neodeploy.reference import PRESETS, ModelSpec, hf_config, load_spec, preset, spec_from_config

# Published parameter counts (model cards / safetensors metadata of EleutherAI's checkpoints).
PARAMS = {
    "pythia-14m": 14_067_712,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "gpt-neox-20b": 20_554_567_680,
    "gpt-neo-125m": 125_198_592,
    "gpt-neo-1.3B": 1_315_575_808,
    "gpt-neo-2.7B": 2_651_307_520,
}


def test_every_preset_has_its_published_parameter_count():
    assert set(PRESETS) == set(PARAMS)
    for name, count in PARAMS.items():
        assert PRESETS[name].num_parameters() == count, name


def test_preset_details():
    neo = preset("EleutherAI/gpt-neo-1.3b")
    assert neo.attention_layers == ("global", "local") * 12 and neo.window_size == 256
    assert (neo.activation, neo.tied_embeddings, neo.eos_token_id, neo.head_dim) == ("gelu_new", True, 50256, 128)
    x20b = preset("gpt-neox-20b")
    assert (x20b.vocab_size, x20b.activation, x20b.rotary_dims, x20b.head_dim) == (50432, "gelu_fast", 24, 96)
    p = preset("pythia-160m")
    assert (p.rotary_dims, p.parallel_residual, p.tied_embeddings, p.activation) == (16, True, False, "gelu")
    with pytest.raises(ConfigError, match="unknown preset 'pythia-7b'"):
        preset("pythia-7b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trips(name):
    spec = PRESETS[name]
    assert spec_from_config(json.loads(json.dumps(hf_config(spec)))) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def _neox_v4(**extra):
    cfg = {"model_type": "gpt_neox", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.5, "rotary_emb_base": 5000,
           "max_position_embeddings": 128, "hidden_act": "gelu_fast", "use_parallel_residual": False}
    cfg.update(extra)
    return cfg


def test_transformers_v4_and_v5_spellings_agree():
    v4 = spec_from_config(_neox_v4(rope_scaling={"type": "linear", "factor": 4.0}))
    v5_cfg = _neox_v4()
    del v5_cfg["rotary_pct"], v5_cfg["rotary_emb_base"]
    v5_cfg["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000, "partial_rotary_factor": 0.5}
    v5 = spec_from_config(v5_cfg)
    assert v4 == v5
    assert (v5.rotary_dims, v5.rotary_base, v5.rope_scaling_type, v5.rope_scaling_factor) == (8, 5000.0, "linear", 4.0)
    plain = spec_from_config(_neox_v4(rope_parameters={"rope_type": "default", "rope_theta": 5000}))
    assert plain.rope_scaling_type is None and plain.rotary_pct == 0.5


@pytest.mark.parametrize(
    "cfg, message",
    [
        (_neox_v4(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (_neox_v4(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
        (_neox_v4(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), "'beta_fast'"),
        (_neox_v4(rope_scaling={"factor": 2.0}), "without a scaling type"),
        (_neox_v4(hidden_act="swiglu"), "activation 'swiglu'"),
        (_neox_v4(model_type="llama"), "model_type 'llama'"),
        (_neox_v4(auto_map={"AutoModelForCausalLM": "modeling_x.X"}), "auto_map"),
        (_neox_v4(num_attention_heads=5), "not divisible"),
        ({"model_type": "gpt_neo", "vocab_size": 10, "hidden_size": 8, "num_layers": 2, "num_heads": 2,
          "attention_types": [[["global", "sparse"], 1]]}, "attention kind 'sparse'"),
        ({"model_type": "gpt_neo", "vocab_size": 10, "hidden_size": 8, "num_layers": 3, "num_heads": 2,
          "attention_types": [[["global", "local"], 1]]}, "cover every layer"),
        (_neox_v4(num_hidden_layers=None), "no 'num_hidden_layers'"),
    ],
)
def test_configs_that_change_the_maths_are_refused(cfg, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config(cfg)


def test_load_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_spec(tmp_path)
