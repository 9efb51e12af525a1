"""PyTorch reference implementations of GPT-Neo and GPT-NeoX, checkpoint loading, and ModelSpec.

`ModelSpec`, `PRESETS`, `preset`, `load_spec` and `spec_from_config` are torch-free; the model and
checkpoint functions import torch on first use, so the runtime can read specs without PyTorch.
"""

from neodeploy.reference.spec import PRESETS, ModelSpec, hf_config, load_spec, preset, spec_from_config

_LAZY = {
    "load_checkpoint": "neodeploy.reference.checkpoint",
    "make_checkpoint": "neodeploy.reference.checkpoint",
    "build_model": "neodeploy.reference.checkpoint",
    "GPTNeo": "neodeploy.reference.gpt_neo",
    "GPTNeoX": "neodeploy.reference.gpt_neox",
    "greedy_generate": "neodeploy.reference.generate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neodeploy.reference' has no attribute {name!r}")


__all__ = ["ModelSpec", "PRESETS", "preset", "load_spec", "spec_from_config", "hf_config", *_LAZY]
