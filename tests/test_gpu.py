"""The runtime's CUDA path: what CPU can pin (which libraries load before a GPU session, what a missing provider
says), and the same golden replay on onnxruntime's CUDA provider where a GPU and onnxruntime-gpu are present."""

from __future__ import annotations

import pytest

from conftest import tiny_neo, tiny_neox
from neodeploy.core.errors import UsageError
from neodeploy.runtime import load
from neodeploy.runtime.backend import load_cuda_libraries


def _cuda_provider() -> str | None:
    """None where onnxruntime offers CUDAExecutionProvider, else why not (the skip reason)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here offers no CUDAExecutionProvider (no GPU, or the CPU build: "
                "scripts/gpu/ installs onnxruntime-gpu on a GPU machine)")
    return None


cuda = pytest.mark.skipif(_cuda_provider() is not None, reason=str(_cuda_provider()))


class _Onnxruntime:
    """onnxruntime's module as load_cuda_libraries sees it: preload_dlls only."""

    def __init__(self):
        self.preloaded = 0

    def preload_dlls(self):
        self.preloaded += 1


@pytest.mark.parametrize("providers, loads", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 1),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider"], 1),
    (["CPUExecutionProvider"], 0),
])
def test_cuda_libraries_are_preloaded_before_a_gpu_session_only(providers, loads):
    """The runtime never imports torch, so nothing else loads CUDA and cuDNN from the nvidia-* wheels for it."""
    ort = _Onnxruntime()
    load_cuda_libraries(ort, providers)
    assert ort.preloaded == loads


def test_an_onnxruntime_without_preload_dlls_is_left_as_it_is():
    load_cuda_libraries(object(), ["CUDAExecutionProvider"])  # onnxruntime < 1.21: nothing to call, nothing raised


@pytest.mark.skipif(_cuda_provider() is None, reason="this machine has the CUDA provider")
def test_asking_for_cuda_on_the_cpu_build_says_how_to_install_the_gpu_build(exported):
    _, art = exported("gpu-neox", tiny_neox())
    with pytest.raises(UsageError) as info:
        load(art, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("for CUDA / TensorRT run pip uninstall onnxruntime, then pip install onnxruntime-gpu")


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", ["neox", "neo"])
def test_golden_replay_on_the_cuda_provider(exported, family, precision):
    from neodeploy.runtime.check import run_check

    _, art = exported(f"gpu-{family}", tiny_neox() if family == "neox" else tiny_neo(), precision)
    model = load(art, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert model.backend.device == "cuda"
    results = run_check(model)
    assert results and all(r.passed for r in results), [r.name for r in results if not r.passed]
