"""Backends run the decoder graph one step at a time: prefill (past = 0) and decode (seq = 1).

The interface is deliberately small so that the native TensorRT backend plugs in beside ONNX Runtime:
a backend takes int64 numpy inputs, returns last-position logits as fp32 numpy, and keeps the KV cache
in its own opaque state object (OrtValues here, device buffers for TensorRT) so no step copies it
through numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neodeploy.errors import UsageError


class Backend(Protocol):
    name: str

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """Run the prompt; returns (logits [batch, vocab] at the last position, cache state)."""

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """One step (seq 1) on top of `state`; returns (logits [batch, vocab], new state)."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits at every position [batch, seq, vocab] (perplexity, validation)."""


class OrtBackend:
    """ONNX Runtime with IO binding: each step's present OrtValues are bound as the next step's past."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, num_layers: int, num_heads: int, head_dim: int, kv_dtype: np.dtype,
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise UsageError(
                f"onnxruntime provider {missing[0]} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA / TensorRT"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.providers = self.session.get_providers()
        dropped = [p for p in providers if p not in self.providers]
        if dropped:  # onnxruntime falls back to CPU silently when a GPU provider fails to initialise
            raise UsageError(f"onnxruntime could not initialise {dropped[0]} (check the CUDA / cuDNN libraries), "
                             "or pass providers=['CPUExecutionProvider']")
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.num_layers, self.num_heads, self.head_dim, self.kv_dtype = num_layers, num_heads, head_dim, kv_dtype
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
        self._ort = ort

    def _empty_cache(self, batch: int) -> list[Any]:
        shape = (batch, self.num_heads, 0, self.head_dim)
        empty = np.zeros(shape, dtype=self.kv_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any], all_positions: bool = False) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # host: the sampler needs it there
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if not all_positions:
            logits = logits[:, -1, :]
        return np.ascontiguousarray(logits, dtype=np.float32), outputs[1:]

    def prefill(self, input_ids, attention_mask, position_ids):
        return self._run(input_ids, attention_mask, position_ids, self._empty_cache(input_ids.shape[0]))

    def decode(self, input_ids, attention_mask, position_ids, state):
        return self._run(input_ids, attention_mask, position_ids, state)

    def score(self, input_ids, attention_mask, position_ids):
        logits = self._run(input_ids, attention_mask, position_ids, self._empty_cache(input_ids.shape[0]), True)[0]
        if logits.shape[1] != input_ids.shape[1]:
            raise UsageError("this graph returns last-position logits only (CPU target); score() needs a portable export")
        return logits


BACKENDS = ("onnxruntime", "tensorrt")


def create_backend(name: str | None, artifact: Path, manifest: dict, providers: list[str] | None = None) -> Backend:
    spec = manifest["spec"]
    head_dim = spec["hidden_size"] // spec["num_heads"]
    kv_dtype = np.float16 if manifest["precision"] == "fp16" else np.float32
    name = name or "onnxruntime"
    if name in ("onnxruntime", "ort"):
        return OrtBackend(artifact / manifest["onnx"]["file"], spec["num_layers"], spec["num_heads"], head_dim,
                          kv_dtype, providers)
    if name in ("tensorrt", "trt"):
        from neodeploy.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(artifact, manifest)
    raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
