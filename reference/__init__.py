"""PyTorch reference implementations of GPT-Neo and GPT-NeoX, and checkpoint loading.

`ModelSpec`, `PRESETS`, `preset`, `load_spec`, `spec_from_config` and `hf_config` live in `neodeploy.core.spec`
(torch-free) and are handed on here for `from neodeploy.reference import preset, ...`; the model and checkpoint
functions import torch on first use.
"""

from neodeploy.core.spec import PRESETS, ModelSpec, hf_config, load_spec, preset, spec_from_config

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
