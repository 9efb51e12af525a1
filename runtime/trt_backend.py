"""The native TensorRT backend: the same step interface as ONNX Runtime, on a built `model.engine`.

One execution context per optimisation profile (0: context / prefill, 1: generation / decode) sharing the
engine's weights, one CUDA stream, KV cache in device buffers used ping-pong (step t's present buffers
are bound as step t+1's past, so the cache never leaves the GPU), logits copied into pinned host memory.
Device memory and copies go through Polygraphy's `cuda` module (a ctypes wrapper of libcudart), not torch.

Written against the TensorRT 10/11 Python API (execute_async_v3, set_input_shape, set_tensor_address,
set_optimization_profile_async); it needs an NVIDIA GPU, so its tests run only where one is present.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from neodeploy.errors import ArtifactError, UsageError
from neodeploy.runtime.manifest import verify_files

KV_BYTES = 2  # fp16 cache: engines are built from fp16 exports


class _Pinned:
    """Page-locked host memory (faster, asynchronous device-to-host copies); pageable numpy as a fallback."""

    def __init__(self, cuda, count: int):
        self.cuda, self.ptr = cuda, ctypes.c_void_p()
        handle = cuda.wrapper().handle
        # c_size_t: a bare Python int would be truncated to 32 bits by ctypes.
        if hasattr(handle, "cudaMallocHost") and handle.cudaMallocHost(ctypes.byref(self.ptr), ctypes.c_size_t(count * 4)) == 0:
            self.array = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.ptr.value))
        else:
            self.ptr = None
            self.array = np.empty(count, np.float32)

    def close(self):
        if self.ptr:
            self.cuda.wrapper().handle.cudaFreeHost(self.ptr)
            self.ptr = None

    __del__ = close


class TensorRTBackend:
    name = "tensorrt"
    exclusive = True  # one set of device buffers: the Model serialises generations on it
    joinable = False  # its cache cannot be re-arranged by rows yet: the engine serves one request at a time
    in_place = False
    kernel_rotary = None

    def __init__(self, artifact: Path, manifest: dict):
        from neodeploy.runtime.gpu import import_tensorrt

        trt = import_tensorrt()
        try:
            from polygraphy import cuda
        except ImportError as exc:
            raise UsageError(f"the TensorRT backend needs polygraphy ({exc}): pip install 'neodeploy[trt]'") from exc
        from neodeploy.runtime.gpu import gpu_info

        info = manifest.get("engine")
        if not info:
            raise UsageError(f"{artifact} has no TensorRT engine; run neodeploy build-engine {artifact} --profile chat")
        verify_files(artifact, manifest, [info["file"]])
        if trt.__version__ != info["tensorrt_version"]:
            raise ArtifactError(f"{info['file']} was built with TensorRT {info['tensorrt_version']} but this machine has "
                                f"{trt.__version__}; rebuild it here: neodeploy build-engine {artifact} --profile {info['profile']['name']}")
        gpu = gpu_info()
        if gpu["compute_capability"] != info["gpu"]["compute_capability"]:
            raise ArtifactError(f"{info['file']} was built for {info['gpu']['name']} (sm {info['gpu']['compute_capability']}) "
                                f"but this GPU is {gpu['name']} (sm {gpu['compute_capability']}); rebuild it here: "
                                f"neodeploy build-engine {artifact} --profile {info['profile']['name']}")
        self.trt, self.cuda = trt, cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((artifact / info["file"]).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {info['file']}; rebuild it with neodeploy build-engine")
        spec = manifest["spec"]
        self.layers, self.heads = spec["num_layers"], spec["num_heads"]
        self.head_dim, self.vocab = spec["hidden_size"] // spec["num_heads"], spec["vocab_size"]
        self.last_only = manifest["onnx"].get("logits", "all") == "last"  # logits [batch, 1, vocab] (--logits last)
        profile = info["profile"]
        self.max_batch, self.max_prompt = profile["batch"]["max"], profile["prompt"]["max"]
        self.max_context = profile["context"]["max"]
        self.stream = cuda.Stream()
        if self.engine.num_optimization_profiles != 2:
            raise ArtifactError(f"{info['file']} has {self.engine.num_optimization_profiles} optimisation profiles, "
                                "expected 2 (context, generation); rebuild it with neodeploy build-engine")
        self.contexts = []
        for index in range(2):
            context = self.engine.create_execution_context()
            if context is None or not context.set_optimization_profile_async(index, self.stream.ptr):
                raise ArtifactError(f"TensorRT could not create the execution context for profile {index}")
            self.contexts.append(context)
        self.lock = threading.Lock()
        cache_bytes = self.max_batch * self.heads * self.max_context * self.head_dim * KV_BYTES
        # Two full sets (ping-pong) of per-layer key and value buffers.
        self.kv = [[cuda.DeviceArray.raw((cache_bytes,)) for _ in range(2 * self.layers)] for _ in range(2)]
        self.inputs = {name: cuda.DeviceArray.raw((self.max_batch * self.max_context * 8,))
                       for name in ("input_ids", "attention_mask", "position_ids")}
        self.logits = cuda.DeviceArray.raw((self.max_batch * self.max_prompt * self.vocab * 4,))
        self.host_logits = _Pinned(cuda, self.max_batch * self.max_prompt * self.vocab)
        self.kv_names = [f"{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.int64)
        self.cuda.wrapper().memcpy(self.inputs[name].ptr, array.ctypes.data, array.nbytes,
                                   self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)

    @staticmethod
    def _bind(context, name: str, ptr: int, shape: tuple[int, ...] | None = None) -> None:
        if shape is not None and not context.set_input_shape(name, shape):
            raise UsageError(f"shape {list(shape)} of {name} is outside the engine's optimisation profile")
        if not context.set_tensor_address(name, ptr):
            raise ArtifactError(f"TensorRT refused the address of {name}; the engine does not match the artifact")

    def close(self) -> None:
        """Free the device buffers and the stream (Polygraphy's arrays are not freed by garbage collection)."""
        for array in [*self.inputs.values(), self.logits, *(a for group in self.kv for a in group)]:
            array.free()
        self.host_logits.close()
        self.stream.free()

    def _run(self, profile: int, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past_len: int, parity: int,
             all_positions: bool) -> np.ndarray:
        batch, seq = ids.shape
        if batch > self.max_batch:
            raise UsageError(f"batch {batch} exceeds the engine's profile (max {self.max_batch}); rebuild with a larger profile")
        if profile == 0 and seq > self.max_prompt:
            raise UsageError(f"prompt of {seq} tokens exceeds the engine's profile (max {self.max_prompt})")
        if past_len + seq > self.max_context:
            raise UsageError(f"context of {past_len + seq} tokens exceeds the engine's profile (max {self.max_context})")
        context = self.contexts[profile]
        for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            self._copy_in(name, array)
            self._bind(context, name, self.inputs[name].ptr, tuple(int(d) for d in array.shape))
        past, present = self.kv[parity], self.kv[1 - parity]
        for k, suffix in enumerate(self.kv_names):
            self._bind(context, f"past_key_values.{suffix}", past[k].ptr, (batch, self.heads, past_len, self.head_dim))
            self._bind(context, f"present.{suffix}", present[k].ptr)
        self._bind(context, "logits", self.logits.ptr)
        if not context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        row = self.vocab * 4
        host = self.host_logits.array
        if all_positions:
            nbytes = batch * seq * row
            self.cuda.wrapper().memcpy(host.ctypes.data, self.logits.ptr, nbytes, self.cuda.MemcpyKind.DeviceToHost,
                                       self.stream.ptr)
            self.stream.synchronize()
            return host[: batch * seq * self.vocab].reshape(batch, seq, self.vocab).copy()
        positions = 1 if self.last_only else seq
        for b in range(batch):  # only each row's last position crosses to the host
            src = self.logits.ptr + ((b * positions) + positions - 1) * row
            self.cuda.wrapper().memcpy(host.ctypes.data + b * row, src, row, self.cuda.MemcpyKind.DeviceToHost,
                                       self.stream.ptr)
        self.stream.synchronize()
        return host[: batch * self.vocab].reshape(batch, self.vocab).copy()

    def prefill(self, input_ids, attention_mask, position_ids, capacity=None):  # buffers are sized by the profile
        logits = self._run(0, input_ids, attention_mask, position_ids, 0, 0, False)
        return logits, (1, input_ids.shape[1])  # present went to set 1

    def decode(self, input_ids, attention_mask, position_ids, state):
        parity, length = state
        logits = self._run(1, input_ids, attention_mask, position_ids, length, parity, False)
        return logits, (1 - parity, length + 1)

    def score(self, input_ids, attention_mask, position_ids):
        if self.last_only:
            raise UsageError("this engine's graph returns last-position logits only (--logits last); score() needs "
                             "an export with --logits all")
        with self.lock:  # shares the buffers with generations
            return self._run(0, input_ids, attention_mask, position_ids, 0, 0, True)
