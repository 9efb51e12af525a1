"""What an export is asked to do: `ExportOptions`, checked before any work, and the choices it is checked against.

Torch-free (the CLI builds its parser from these defaults without the export extra); `graph` and `quantize`
import their opset and int4 choices from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from neodeploy.core.errors import UsageError
from neodeploy.core.files import parse_size
from neodeploy.core.manifest import TARGETS

PRECISIONS = ("fp32", "fp16")
LOGITS = ("all", "last")
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(17, 22)
METHODS = ("int8", "int4")  # --quantize
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 64  # int4 body: q4_0's bits (4 + 32 / 64 per weight); 32 is more accurate, 128 faster
HEAD_BITS = (8, 4)  # int4's lm_head
DEFAULT_HEAD_BITS = 8  # as llama.cpp keeps its output tensor at 6-8 bits


@dataclass(frozen=True)
class ExportOptions:
    """One export request besides its two folders. What needs the checkpoint (max_context against its positions)
    is checked by `pipeline.check_request` once the spec is read."""

    precision: str = "fp32"  # fp32, or fp16 with fp32 islands
    opset: int = DEFAULT_OPSET
    max_context: int | None = None  # default: the model's max positions
    overwrite: bool = False
    quantize: str | None = None  # int8 or int4 weights (fp32 exports)
    block_size: int = DEFAULT_BLOCK  # int4's layers
    head_bits: int = DEFAULT_HEAD_BITS  # int4's lm_head
    target: str = "portable"  # portable, cpu or cuda
    logits: str | None = None  # all or last; default: all for portable, last for cpu and cuda
    reuse_reference: bool = True  # the reference stage from $NEODEPLOY_CACHE/reference when it matches
    max_memory: int | str | None = None  # bytes (or "32GB") the export may use; default what the machine has
    chat_template: str | None = None  # Jinja text shipped as chat_template.jinja

    def __post_init__(self) -> None:
        target, logits = self.target, self.logits
        if target not in TARGETS:
            raise UsageError(f"--target {target!r} is not supported; choose portable (TensorRT, Optimum), cpu or cuda")
        if target == "cuda" and (self.precision != "fp16" or self.quantize):
            raise UsageError("--target cuda is fp16 (onnxruntime's CUDA GroupQueryAttention runs fp16 only): "
                             "export with --precision fp16 and no --quantize")
        if logits is not None and logits not in LOGITS:
            raise UsageError(f"--logits {logits!r} is not supported; choose all or last")
        if target in ("cpu", "cuda") and logits == "all":
            raise UsageError(f"--target {target} returns last-position logits only; drop --logits all, or export "
                             "--target portable")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not supported; choose fp32 or fp16")
        if self.quantize is not None:
            if self.quantize not in METHODS:
                raise UsageError(f"--quantize {self.quantize!r} is not supported; choose int8 or int4")
            if self.precision != "fp32":
                raise UsageError("--quantize applies to fp32 exports (weights are quantised from fp32); drop --precision fp16")
            if self.quantize == "int4" and self.block_size not in BLOCK_SIZES:
                raise UsageError(f"--block-size {self.block_size} is not supported; choose 32, 64 or 128")
            if self.quantize == "int4" and self.head_bits not in HEAD_BITS:
                raise UsageError(f"--head-bits {self.head_bits} is not supported; choose 8 or 4")
        if self.opset not in SUPPORTED_OPSETS:
            raise UsageError(f"opset {self.opset} is not supported; choose {SUPPORTED_OPSETS.start}.."
                             f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
        if isinstance(self.max_memory, str):
            size = parse_size(self.max_memory)
            if size is None or size < 1:
                raise UsageError(f"--max-memory {self.max_memory!r} is not a size; give one with its unit, e.g. 32GB or 24GiB")
            object.__setattr__(self, "max_memory", size)

    @property
    def last_logits(self) -> bool:
        """The graph returns the last position's logits only (cpu and cuda always; portable on request)."""
        return (self.logits or ("last" if self.target in ("cpu", "cuda") else "all")) == "last"

    @property
    def in_place(self) -> bool:
        """The fused attention writes its keys into a cache bound as both past and present: the CPU target in fp32
        (onnxruntime's CPU kernel ran slower in fp16, so an fp16 CPU export keeps the plain attention) and the CUDA
        target."""
        return self.target == "cuda" or (self.target == "cpu" and self.precision == "fp32")

    @property
    def gate(self) -> str:
        """The verification tolerance that applies: the quantisation's, else the precision's."""
        return self.quantize or self.precision
