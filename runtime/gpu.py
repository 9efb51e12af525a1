"""GPU facts without torch or cuda-python: the CUDA driver API through ctypes, and a guarded TensorRT import.
Torch-free, so the TensorRT backend and build-engine work where only `neodeploy[trt]` is installed."""

from __future__ import annotations

import ctypes

from neodeploy.core.errors import UsageError


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "tensorrt":
            what = "the tensorrt package is not installed"
        else:  # installed but broken (a missing libnvinfer, a CUDA mismatch): its own words say which
            what = f"tensorrt is installed but does not load ({exc})"
        raise UsageError(f"this needs TensorRT and {what}; on a machine with an NVIDIA GPU run "
                         "pip install 'neodeploy[trt]'") from exc
    return trt


def gpu_info() -> dict:
    """Name and compute capability of GPU 0."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise UsageError("no NVIDIA driver (libcuda.so.1) found; TensorRT engines need an NVIDIA GPU") from exc
    device = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        raise UsageError("the NVIDIA driver found no usable GPU")
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}
