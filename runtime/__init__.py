"""Serving without PyTorch: numpy + onnxruntime (or TensorRT) + tokenizers.

Nothing in this package may import torch, directly or through neodeploy.reference's model code.
"""

from neodeploy.runtime.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
