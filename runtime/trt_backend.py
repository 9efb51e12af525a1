"""The native TensorRT backend: the same step interface as ONNX Runtime, on a built `model.engine`.

One execution context per optimisation profile (0: context / prefill, 1: generation / decode) sharing the
engine's weights and one block of activation memory (they never run at once), one CUDA stream, KV cache in
device buffers used ping-pong (step t's present buffers are bound as step t+1's past, so the cache never leaves
the GPU), last-position logits copied into pinned host memory. Device memory and copies go through Polygraphy's
`cuda` module (a ctypes wrapper of libcudart), not torch.

At load the engine's I/O is checked against the artifact's contract (names, directions, dtypes) and the batch,
prompt and context limits are read from the engine's own optimisation profiles, so a mismatched engine is refused
instead of being written out of bounds.

Written against the TensorRT 10/11 Python API (execute_async_v3, set_input_shape, set_tensor_address,
set_optimization_profile_async, get_tensor_profile_shape); it needs an NVIDIA GPU, so its tests run only where one
is present, and everything that can be checked without one (the I/O contract, the limits, the CUDA runtime
lookup) is tested on CPU with a stand-in engine.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.core.manifest import Manifest, read_verified


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


def cuda_runtime():
    """Polygraphy's CUDA module with its libcudart loaded: a missing runtime is one line saying what to install."""
    try:
        from polygraphy import cuda
    except ImportError as exc:
        raise UsageError(f"the TensorRT backend needs polygraphy ({exc}): pip install 'neodeploy[trt]'") from exc
    try:
        cuda.wrapper()
    except OSError as exc:  # Polygraphy falls back to dlopen("libcudart.so"), which raises where none is found
        raise UsageError(f"the TensorRT backend needs the CUDA runtime library libcudart.so, which was not found "
                         f"({exc}); pip install nvidia-cuda-runtime-cu12 (or -cu13, as your TensorRT), or add the "
                         "folder that holds libcudart.so to LD_LIBRARY_PATH") from exc
    return cuda


def engine_contract(spec) -> dict[str, tuple[str, str]]:
    """The engine's I/O as export writes the fp16 graph: name -> (direction, TensorRT dtype name)."""
    io = {name: ("INPUT", "INT64") for name in ("input_ids", "attention_mask", "position_ids")}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            io[f"past_key_values.{i}.{kind}"] = ("INPUT", "HALF")
            io[f"present.{i}.{kind}"] = ("OUTPUT", "HALF")
    io["logits"] = ("OUTPUT", "FLOAT")
    return io


def check_engine_io(engine, trt, spec, name: str) -> dict[str, int]:
    """Refuse an engine whose I/O differs from the artifact's contract; return its limits from its profiles:
    max_batch, max_prompt (profile 0's input_ids) and max_context (profile 1's attention_mask, past + 1)."""
    if engine.num_optimization_profiles != 2:
        raise ArtifactError(f"{name} has {engine.num_optimization_profiles} optimisation profiles, expected 2 "
                            "(context, generation); rebuild it with neodeploy build-engine")
    expected = engine_contract(spec)
    actual = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    missing, extra = sorted(expected.keys() - actual), sorted(actual - expected.keys())
    if missing or extra:
        what = "; ".join(p for p in (f"missing {missing[:4]}" if missing else "",
                                     f"unexpected {extra[:4]}" if extra else "") if p)
        raise ArtifactError(f"{name} does not have this artifact's inputs and outputs ({what}); it was built from "
                            "another export: rebuild it with neodeploy build-engine")
    for tensor, (mode, dtype) in expected.items():
        got_mode, got_dtype = engine.get_tensor_mode(tensor), engine.get_tensor_dtype(tensor)
        if got_mode != getattr(trt.TensorIOMode, mode) or got_dtype != getattr(trt.DataType, dtype):
            raise ArtifactError(f"{name}: {tensor} is {got_mode.name} {got_dtype.name}, the artifact's contract is "
                                f"{mode} {dtype}; rebuild the engine with neodeploy build-engine")

    def high(tensor: str, profile: int) -> tuple[int, ...]:
        return tuple(engine.get_tensor_profile_shape(tensor, profile)[2])  # (min, opt, max)

    context_ids, generation_mask = high("input_ids", 0), high("attention_mask", 1)
    return {"max_batch": min(context_ids[0], high("input_ids", 1)[0]), "max_prompt": context_ids[1],
            "max_context": generation_mask[1]}


class TensorRTBackend:
    name = "tensorrt"
    exclusive = True  # one set of device buffers: the Model serialises generations on it
    joinable = False  # its cache cannot be re-arranged by rows yet: the engine serves one request at a time
    in_place = False
    extends_rows = False
    aligned = False
    kernel_rotary = None
    verifies = False  # speculation (several logits positions per decode call) is not wired to its profiles

    def __init__(self, artifact: Path, manifest: Manifest):
        from neodeploy.runtime.gpu import gpu_info, import_tensorrt

        trt = import_tensorrt()
        info = manifest.engine
        if not info:
            raise UsageError(f"{artifact} has no TensorRT engine; run neodeploy build-engine {artifact} --profile chat")
        rebuild = f"neodeploy build-engine {artifact} --profile {(info.get('profile') or {}).get('name', 'chat')}"
        if trt.__version__ != info["tensorrt_version"]:
            raise ArtifactError(f"{info['file']} was built with TensorRT {info['tensorrt_version']} but this machine has "
                                f"{trt.__version__}; rebuild it here: {rebuild}")
        gpu, built_for = gpu_info(), info.get("gpu") or {}
        if gpu["compute_capability"] != built_for.get("compute_capability"):
            raise ArtifactError(f"{info['file']} was built for {built_for.get('name')} (sm "
                                f"{built_for.get('compute_capability')}) but this GPU is {gpu['name']} (sm "
                                f"{gpu['compute_capability']}); rebuild it here: {rebuild}")
        cuda = cuda_runtime()
        self.trt, self.cuda = trt, cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        # One read that is hashed as it goes, then deserialised from that buffer: an engine as large as the
        # weights is neither read twice nor held twice.
        self.engine = self.runtime.deserialize_cuda_engine(read_verified(manifest, info["file"]))
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {info['file']}; rebuild it: {rebuild}")
        spec = manifest.spec
        self.layers, self.heads, self.head_dim, self.vocab = spec.num_layers, spec.num_heads, spec.head_dim, spec.vocab_size
        limits = check_engine_io(self.engine, trt, spec, info["file"])
        self.max_batch, self.max_prompt, self.max_context = limits["max_batch"], limits["max_prompt"], limits["max_context"]
        self.last_only = manifest.onnx.logits == "last"
        self.stream = cuda.Stream()
        # Both contexts run on one stream, never at once: one block of activation memory serves them.
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = [self.engine.create_execution_context(strategy) for _ in range(2)]
        if any(c is None for c in self.contexts):
            raise ArtifactError(f"TensorRT could not create the execution contexts of {info['file']} (device memory?)")
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size  # 10.1+ / 10.0
        self.activations = cuda.DeviceArray.raw((max(int(size), 1),))
        for index, context in enumerate(self.contexts):
            if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1 takes the size too
                context.set_device_memory(self.activations.ptr, int(size))
            else:
                context.device_memory = self.activations.ptr
            try:  # raises on failure (it returns True otherwise, so a `not …` test could never fire)
                context.set_optimization_profile_async(index, self.stream.ptr)
            except RuntimeError as exc:
                raise ArtifactError(f"TensorRT could not select optimisation profile {index} of {info['file']} "
                                    f"({exc}); rebuild it: {rebuild}") from exc
        self.lock = threading.Lock()
        cache_bytes = self.max_batch * self.heads * self.max_context * self.head_dim * manifest.kv_bytes
        # Two full sets (ping-pong) of per-layer key and value buffers.
        self.kv = [[cuda.DeviceArray.raw((cache_bytes,)) for _ in range(2 * self.layers)] for _ in range(2)]
        self.inputs = {name: cuda.DeviceArray.raw((self.max_batch * self.max_context * 8,))
                       for name in ("input_ids", "attention_mask", "position_ids")}
        # The engine writes logits for the positions its graph returns: the last one (--logits last), or all of a
        # prefill's. Only last positions cross to the host, except for score(), whose host buffer is made on demand.
        positions = 1 if self.last_only else self.max_prompt
        self.logits = cuda.DeviceArray.raw((self.max_batch * positions * self.vocab * 4,))
        self.host_logits = _Pinned(cuda, self.max_batch * self.vocab)
        self.host_all: np.ndarray | None = None
        self.kv_names = [f"{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.int64)
        self.cuda.wrapper().memcpy(self.inputs[name].ptr, array.ctypes.data, array.nbytes,
                                   self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)

    def _bind(self, context, name: str, ptr: int, shape: tuple[int, ...] | None = None) -> None:
        if shape is not None and not context.set_input_shape(name, shape):
            profile = context.active_optimization_profile if hasattr(context, "active_optimization_profile") else 0
            low, _, high = self.engine.get_tensor_profile_shape(name, profile)
            raise UsageError(f"shape {list(shape)} of {name} is outside the engine's optimisation profile {profile} "
                             f"({list(low)} .. {list(high)}); rebuild the engine with a larger deployment profile")
        if not context.set_tensor_address(name, ptr):
            raise ArtifactError(f"TensorRT refused the address of {name}; the engine does not match the artifact")

    def close(self) -> None:
        """Free the device buffers and the stream (Polygraphy's arrays are not freed by garbage collection)."""
        for array in [*self.inputs.values(), self.logits, self.activations, *(a for group in self.kv for a in group)]:
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
        copy = self.cuda.wrapper().memcpy
        if all_positions:  # score(), which refuses a last-position graph
            if self.host_all is None:
                self.host_all = np.empty(self.max_batch * self.max_prompt * self.vocab, np.float32)
            copy(self.host_all.ctypes.data, self.logits.ptr, batch * seq * row, self.cuda.MemcpyKind.DeviceToHost,
                 self.stream.ptr)
            self.stream.synchronize()
            return self.host_all[: batch * seq * self.vocab].reshape(batch, seq, self.vocab).copy()
        host = self.host_logits.array
        if self.last_only or seq == 1:  # [batch, 1, vocab]: one contiguous copy
            copy(host.ctypes.data, self.logits.ptr, batch * row, self.cuda.MemcpyKind.DeviceToHost, self.stream.ptr)
        else:
            for b in range(batch):  # only each row's last position crosses to the host
                src = self.logits.ptr + ((b * seq) + seq - 1) * row
                copy(host.ctypes.data + b * row, src, row, self.cuda.MemcpyKind.DeviceToHost, self.stream.ptr)
        self.stream.synchronize()
        return host[: batch * self.vocab].reshape(batch, self.vocab).copy()

    def prefill(self, input_ids, attention_mask, position_ids, capacity=None):  # buffers are sized by the profile
        logits = self._run(0, input_ids, attention_mask, position_ids, 0, 0, False)
        return logits, (1, input_ids.shape[1])  # present went to set 1

    def decode(self, input_ids, attention_mask, position_ids, state):
        parity, length = state
        logits = self._run(1, input_ids, attention_mask, position_ids, length, parity, False)
        return logits, (1 - parity, length + 1)

    def verify(self, input_ids, attention_mask, position_ids, state):
        raise UsageError("the TensorRT backend does not verify drafted tokens; speculate with the onnxruntime backend")

    def score(self, input_ids, attention_mask, position_ids):
        if self.last_only:
            raise UsageError("this engine's graph returns last-position logits only (--logits last); score() needs "
                             "an export with --logits all")
        with self.lock:  # shares the buffers with generations
            return self._run(0, input_ids, attention_mask, position_ids, 0, 0, True)
