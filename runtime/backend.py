"""Backends run the decoder graph one step at a time: prefill (past = 0) and decode (seq = 1).

The interface is deliberately small so that the native TensorRT backend plugs in beside ONNX Runtime:
a backend takes int64 numpy inputs, returns last-position logits as fp32 numpy, and keeps the KV cache
in its own opaque state object (OrtValues here, device buffers for TensorRT) so no step copies it
through numpy.
"""

from __future__ import annotations

import contextlib
import math
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.core.manifest import Manifest


class Backend(Protocol):
    """What every caller of a backend uses, and nothing else.

    Limits are None where the backend has none of its own (beyond the artifact's max_context). An `exclusive`
    backend has one set of buffers: its callers hold `lock` for a whole generation. A `joinable` backend's cache
    can be re-arranged by rows (the engine's continuous batching); `cache_arrays` / `wrap_cache` / `new_cache` /
    `set_rows` are only called on joinable backends."""

    name: str
    max_batch: int | None
    max_prompt: int | None
    max_context: int | None
    exclusive: bool
    lock: Any  # a context manager
    joinable: bool
    aligned: bool  # rows left-aligned in the cache, masks right-padded (--target cuda): DecodeBatch is an AlignedBatch
    in_place: bool
    kernel_rotary: Any  # batch.RotaryTable when keys are rotated at their cache index (CPU target), else None
    verifies: bool  # `verify` returns logits at several positions in one call (speculative decoding)
    # `decode` takes several tokens for each of several rows over a past (GroupQueryAttention's CPU kernel, the CPU
    # and CUDA targets' attention, takes several tokens over a past for one row only)
    extends_rows: bool

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, Any]:
        """Run the prompt; returns (logits [batch, vocab] at the last position, cache state). capacity: the total
        length (prompt + new tokens) the caller expects, so a backend can size its cache once."""

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """One step (seq 1, or a prefill chunk at batch 1) on top of `state`; returns (logits [batch, vocab], new state)."""

    def verify(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """decode() with logits at every one of the input's positions [batch, seq, vocab] (drafted tokens checked at
        once). Only called where `verifies`."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits at every position [batch, seq, vocab] (perplexity, validation)."""

    def cache_arrays(self, state: Any, rows: int, width: int) -> list[np.ndarray]:
        """Host arrays [rows, heads, width, head_dim] per past input; views that write through for an in-place cache."""

    def wrap_cache(self, arrays: list[np.ndarray]) -> Any:
        """A state holding exactly these arrays as the past."""

    def new_cache(self, rows: int, capacity: int) -> Any:
        """An empty in-place cache pool of rows x capacity tokens (allocated once)."""

    def set_rows(self, state: Any, rows: int) -> None:
        """An in-place pool's first `rows` rows are the batch from now on."""

    def release(self, state: Any) -> None:
        """Done with this cache (its rows were copied into the batch): a backend may keep its memory for the next
        new_cache."""

    def close(self) -> None:
        """Free what the backend holds."""


class InPlaceCache:
    """One preallocated [batch, heads, capacity, head_dim] buffer per past input, bound as both the past input
    and the present output, so GroupQueryAttention (CPU target) writes each step's keys into it and decode
    allocates no cache at all. Grows (one copy) if a caller goes past the capacity it asked for. As the
    engine's pool, only the first `rows` rows are bound (a contiguous view: no copy)."""

    def __init__(self, ort, count: int, shape: tuple[int, int, int, int], dtype, memory: np.ndarray | None = None):
        # The arrays are views into one flat buffer, so a consumed cache's memory can serve the next one whole.
        size = math.prod(shape)
        if memory is None:
            memory = np.zeros(count * size, dtype=dtype)
            # Fault the pages in now: np.zeros maps them lazily, and with transparent huge pages the first write to
            # each row of a large pool would zero ~150 MB mid-serving (measured: 330 ms per row joining, pythia-160m).
            memory.fill(0)
        self.memory = memory
        self.arrays = [memory[i * size : (i + 1) * size].reshape(shape) for i in range(count)]
        self._ort = ort
        self.rows = shape[0]
        self._values: tuple[int, list[Any]] | None = None

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    @property
    def values(self) -> list[Any]:
        # Wrapping a host array shares its memory: the kernel's writes land in self.arrays.
        if self._values is None or self._values[0] != self.rows:
            self._values = (self.rows, [self._ort.OrtValue.ortvalue_from_numpy(a[: self.rows]) for a in self.arrays])
        return self._values[1]

    def ensure(self, total: int) -> None:
        if total <= self.capacity:
            return
        old = self.arrays
        b, h, cap, d = old[0].shape
        grown = InPlaceCache(self._ort, len(old), (b, h, max(total, 2 * cap), d), old[0].dtype)
        for new, a in zip(grown.arrays, old):
            new[:, :, :cap] = a
        self.memory, self.arrays, self._values = grown.memory, grown.arrays, None


class SpareMemory:
    """The memory of consumed per-request caches, kept for the next ones. Each request's prefill (and each prefix
    cache hit) runs in a cache of its own that is copied into the batch when it joins; faulting fresh pages in for
    every one cost 8-117 ms per 39 MB (pythia-160m, 528 tokens; 2-core VM, measured in `serve`), more than the hit's
    own 16 tokens. Reused buffers hold only earlier keys and values (finite numbers): a cache reads no position past
    a row's length, and the positions a prefill pads are written by it. At most `limit` bytes are kept, newest
    first."""

    def __init__(self, dtype, limit: int = 256 << 20):
        self.dtype, self.limit = np.dtype(dtype), limit
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()  # threads calling Model.generate on one model share its backend

    def take(self, size: int) -> np.ndarray | None:
        """The smallest kept buffer of at least `size` elements (a view of its first `size`), or None."""
        with self._lock:
            fits = [b for b in self._buffers if b.size >= size]
            if not fits:
                return None
            best = min(fits, key=lambda b: b.size)
            self._buffers = [b for b in self._buffers if b is not best]
        return best[:size]

    def give(self, memory: np.ndarray) -> None:
        base = memory if memory.base is None else memory.base
        if base.dtype != self.dtype or base.nbytes > self.limit:
            return
        with self._lock:
            self._buffers.insert(0, base)
            while sum(b.nbytes for b in self._buffers) > self.limit:
                self._buffers.pop()


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def load_cuda_libraries(ort, providers: list[str]) -> None:
    """Before a GPU session: onnxruntime-gpu's preload_dlls loads CUDA and cuDNN from the nvidia-* wheels where
    they are installed that way (as PyTorch's wheels install them) rather than on the library path. A process that
    imported torch first has them already; this runtime never imports torch, so without it the CUDA provider fails
    to initialise (onnxruntime's CUDA EP documentation, "Preload DLLs"). onnxruntime < 1.21 has no preload_dlls."""
    preload = getattr(ort, "preload_dlls", None)  # a version difference of onnxruntime's, not an optional seam of ours
    if preload is not None and any(p in GPU_PROVIDERS for p in providers):
        preload()


class OrtBackend:
    """ONNX Runtime with IO binding: each step's present OrtValues are bound as the next step's past; with an
    in-place artifact (CPU target) on CPU, past and present are the same preallocated buffers (InPlaceCache)."""

    name = "onnxruntime"
    max_batch = max_prompt = max_context = None
    exclusive = False
    lock = contextlib.nullcontext()
    joinable = True
    aligned = False

    def __init__(self, model_path: Path, num_layers: int, num_heads: int, head_dim: int, kv_dtype: np.dtype,
                 providers: list[str] | None = None, threads: int | None = None, in_place: bool = False,
                 kernel_rotary: Any = None, logits: str = "all", extends_rows: bool = False):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise UsageError(
                f"onnxruntime provider {missing[0]} is not available here (available: {', '.join(available)}); "
                "for CUDA / TensorRT run pip uninstall onnxruntime, then pip install onnxruntime-gpu"
            )
        load_cuda_libraries(ort, providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"onnxruntime cannot load {model_path} ({first[:200]}); the graph is corrupt or "
                                "truncated: re-export the artifact") from exc
        self.providers = self.session.get_providers()
        dropped = [p for p in providers if p not in self.providers]
        if dropped:  # onnxruntime falls back to CPU silently when a GPU provider fails to initialise
            raise UsageError(f"onnxruntime could not initialise {dropped[0]} (check the CUDA / cuDNN libraries), "
                             "or pass providers=['CPUExecutionProvider']")
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.num_layers, self.num_heads, self.head_dim, self.kv_dtype = num_layers, num_heads, head_dim, kv_dtype
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        self.in_place = in_place and self.device == "cpu"
        self._spare = SpareMemory(self.kv_dtype)
        self.kernel_rotary = kernel_rotary
        # all: every position; tail: the last, or the last num_logits when that input is bound; last: the last only
        self.logits = logits
        self.verifies = logits in ("all", "tail")
        self.extends_rows = extends_rows
        self._ort = ort

    def _empty_cache(self, batch: int) -> list[Any]:
        shape = (batch, self.num_heads, 0, self.head_dim)
        empty = np.zeros(shape, dtype=self.kv_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any] | InPlaceCache,
             all_positions: bool = False) -> tuple[np.ndarray, list[Any] | InPlaceCache]:
        binding = self.session.io_binding()
        if self.logits == "tail":  # the last position, or every fed one (a verification)
            binding.bind_cpu_input("num_logits", np.array([ids.shape[1] if all_positions else 1], dtype=np.int64))
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        shared = isinstance(past, InPlaceCache)
        if shared:
            past.ensure(mask.shape[1])
        for name, value in zip(self.past_names, past.values if shared else past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # host: the sampler needs it there
        for i, name in enumerate(self.present_names):
            if shared:
                binding.bind_ortvalue_output(name, past.values[i])
            else:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if not all_positions:
            logits = logits[:, -1, :]
        return np.ascontiguousarray(logits, dtype=np.float32), past if shared else outputs[1:]

    def prefill(self, input_ids, attention_mask, position_ids, capacity=None):
        if self.in_place:
            batch, seq = input_ids.shape
            cache = self.new_cache(batch, max(capacity or 0, seq + 1))
            return self._run(input_ids, attention_mask, position_ids, cache)
        return self._run(input_ids, attention_mask, position_ids, self._empty_cache(input_ids.shape[0]))

    def decode(self, input_ids, attention_mask, position_ids, state):
        return self._run(input_ids, attention_mask, position_ids, state)

    def verify(self, input_ids, attention_mask, position_ids, state):
        if not self.verifies:
            raise UsageError("this graph returns last-position logits only; speculation needs --target cpu or --logits all")
        return self._run(input_ids, attention_mask, position_ids, state, all_positions=True)

    def cache_arrays(self, state, rows, width):
        if isinstance(state, InPlaceCache):
            return [a[:rows, :, :width] for a in state.arrays]
        return [v.numpy()[:rows, :, :width] for v in state]

    def wrap_cache(self, arrays):
        return [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in arrays]

    def new_cache(self, rows, capacity):
        shape = (rows, self.num_heads, capacity, self.head_dim)
        return InPlaceCache(self._ort, len(self.past_names), shape, self.kv_dtype,
                            self._spare.take(len(self.past_names) * math.prod(shape)))

    def release(self, state):
        if isinstance(state, InPlaceCache):
            self._spare.give(state.memory)

    def set_rows(self, state, rows):
        state.rows = rows

    def close(self) -> None:
        pass

    def score(self, input_ids, attention_mask, position_ids):
        logits = self._run(input_ids, attention_mask, position_ids, self._empty_cache(input_ids.shape[0]), True)[0]
        if logits.shape[1] != input_ids.shape[1]:
            raise UsageError("this graph returns last-position logits only (--logits last or --target cpu); score() needs "
                             "an export with --logits all")
        return logits


BACKENDS = ("onnxruntime", "tensorrt")


def create_backend(name: str | None, artifact: Path, manifest: Manifest, providers: list[str] | None = None,
                   threads: int | None = None) -> Backend:
    spec = manifest.spec
    name = name or "onnxruntime"
    if name in ("onnxruntime", "ort") and manifest.onnx.target == "cuda":
        from neodeploy.runtime.aligned import AlignedBackend, check_cuda

        check_cuda(artifact, providers)
        return AlignedBackend(artifact / manifest.onnx.file, spec.num_layers, spec.num_heads, spec.head_dim,
                              manifest.kv_dtype, providers, threads)
    if name in ("onnxruntime", "ort"):
        rotary = None
        if manifest.onnx.rotary == "kernel":  # keys are rotated at their cache index: moving a row re-rotates them
            from neodeploy.runtime.batch import RotaryTable

            rotary = RotaryTable(spec.rotary_dims, spec.rotary_base, spec.rope_scaling_factor)
        return OrtBackend(artifact / manifest.onnx.file, spec.num_layers, spec.num_heads, spec.head_dim,
                          manifest.kv_dtype, providers, threads, in_place=manifest.onnx.kv_cache == "in-place",
                          kernel_rotary=rotary, logits=manifest.onnx.logits,
                          extends_rows=manifest.onnx.target == "portable")
    if name in ("tensorrt", "trt"):
        from neodeploy.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(artifact, manifest)
    raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
