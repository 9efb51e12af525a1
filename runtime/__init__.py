"""Serving without PyTorch: numpy + onnxruntime (or TensorRT) + tokenizers.

    from neodeploy.runtime import load
    model = load("artifact/")
    print(model.generate("Hello", max_new_tokens=16)[0].text)

Nothing in this package may import torch, directly or through neodeploy.reference's model code.
"""

from neodeploy.core.tokenizer import Tokenizer
from neodeploy.runtime.model import Generation, Model, load

__all__ = ["load", "Model", "Generation", "Tokenizer"]
