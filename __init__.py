"""neodeploy: export GPT-Neo / GPT-NeoX checkpoints to ONNX and TensorRT, and serve them without PyTorch.

Importing the top-level package stays cheap and torch-free; the stages live in
`neodeploy.reference` (PyTorch), `neodeploy.export` (torch + onnx) and `neodeploy.runtime` (numpy +
onnxruntime + tokenizers).
"""

__version__ = "0.1.0"

from neodeploy.core.errors import (  # noqa: E402
    ArtifactError,
    CheckpointError,
    ConfigError,
    NeodeployError,
    TokenizerError,
    UsageError,
    ExportError,
    VerificationError,
    OverloadedError,
    ClosedError,
)

__all__ = ["__version__", "NeodeployError", "ArtifactError", "ExportError", "VerificationError", "ConfigError", "CheckpointError", "TokenizerError", "UsageError", "OverloadedError", "ClosedError"]
