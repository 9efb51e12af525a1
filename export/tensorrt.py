"""`neodeploy build-engine`: a TensorRT fp16 engine from an fp16 artifact, with two optimisation profiles.

Written against the TensorRT 10/11 Python API and Polygraphy's loaders; it cannot run on a machine
without an NVIDIA GPU, so everything around it (profiles, lint, manifest) is tested on CPU and the
build itself by GPU-only tests. Precision lives in the graph: TensorRT parses it into a strongly typed
network (TensorRT >= 10.0; the only mode of TensorRT 11), so the Casts of the fp32 islands are obeyed.
"""

from __future__ import annotations

import datetime
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.core.files import link_files, make_temp_dir, publish
from neodeploy.profiles import DeploymentProfile, load_profile, trt_profiles
from neodeploy.runtime.gpu import gpu_info, import_tensorrt
from neodeploy.core.manifest import MANIFEST, Manifest, read_manifest, verify_files, write_manifest

ENGINE = "model.engine"


def _write_engine(host_memory, path: Path, chunk: int = 1 << 26) -> tuple[int, str]:
    """Stream TensorRT's serialized engine (IHostMemory: the buffer protocol, no len()) to `path`, hashing as it
    goes: `bytes(...)` would hold a second copy of an engine as large as the weights (≈ 40 GB for gpt-neox-20b)."""
    import hashlib

    view = memoryview(host_memory).cast("B")
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, view.nbytes, chunk):
            block = view[start : start + chunk]
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return view.nbytes, digest.hexdigest()


def _heartbeat(echo: Callable[[str], None], stop: threading.Event, start: float) -> None:
    while not stop.wait(30):
        echo(f"      still building ... {time.perf_counter() - start:.0f} s")


def build_engine(artifact: str | Path, profile: str | Path, *, timing_cache: str | Path | None = None,
                 opt_level: int = 3, workspace_gib: float | None = None, echo: Callable[[str], None] = print) -> Path:
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    deployment: DeploymentProfile = load_profile(profile)
    if manifest.dtype != "fp16" or manifest.quantization:
        raise UsageError(f"{artifact} is an {manifest.precision} export; TensorRT engines are built from fp16 "
                         "exports: run neodeploy export --precision fp16")
    if manifest.onnx.target != "portable":
        raise UsageError(f"{artifact} is a --target {manifest.onnx.target} export (onnxruntime-only fused ops); build engines from the "
                         "portable export: neodeploy export --precision fp16")
    shapes = trt_profiles(deployment, manifest.spec, manifest.max_context)  # a profile that does not fit: before GPU work
    if not 0 <= opt_level <= 5:
        raise UsageError(f"--opt-level must be 0..5, got {opt_level}")
    if workspace_gib is not None and not workspace_gib > 0:
        raise UsageError(f"--workspace must be a positive number of GiB, got {workspace_gib}")
    onnx_file = artifact / manifest.onnx.file
    verify_files(manifest, [manifest.onnx.file, manifest.onnx.external_data])
    trt = import_tensorrt()
    gpu = gpu_info()
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException
    except ImportError as exc:
        raise UsageError(f"build-engine needs polygraphy ({exc}): pip install 'neodeploy[trt]'") from exc

    # Strongly typed (TensorRT >= 10.0, Polygraphy >= 0.49.9; the only mode of TensorRT 11): the graph's Casts
    # decide precision, so the fp32 islands stay fp32 without per-layer pinning.
    echo(f"[1/3] parse {onnx_file.name} with TensorRT {trt.__version__} on {gpu['name']} "
         f"(sm {gpu['compute_capability']}), strongly typed")
    network = NetworkFromOnnxPath(str(onnx_file), strongly_typed=True)
    profiles = []
    for name in ("context", "generation"):
        p = Profile()
        for tensor, (low, opt, high) in shapes[name].items():
            p.add(tensor, min=low, opt=opt, max=high)
        profiles.append(p)
    cache = Path(timing_cache) if timing_cache else None
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)  # Polygraphy saves it only after the build
    config = CreateConfig(
        profiles=profiles,
        load_timing_cache=str(cache) if cache and cache.is_file() else None,
        builder_optimization_level=opt_level,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))} if workspace_gib else None,
    )
    echo(f"[2/3] build: profile {deployment.name!r} ({deployment.description}), optimisation level {opt_level}"
         + (f", timing cache {cache}" if cache else ""))
    start = time.perf_counter()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(echo, stop, start), daemon=True)
    beat.start()
    try:
        host_memory = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache) if cache else None)()
    except PolygraphyException as exc:
        raise ArtifactError(f"TensorRT could not build the engine ({str(exc).splitlines()[0]}); "
                            f"run neodeploy lint {artifact} --profile {deployment.name}") from exc
    finally:
        stop.set()
    seconds = time.perf_counter() - start
    engine = {
        "file": ENGINE,
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "strongly_typed": True,
        "optimization_level": opt_level,
        "profile": {"name": deployment.name, "description": deployment.description,
                    "batch": vars(deployment.batch), "prompt": vars(deployment.prompt), "context": vars(deployment.context)},
        "optimization_profiles": {name: {t: [list(s) for s in v] for t, v in inputs.items()} for name, inputs in shapes.items()},
        "build_seconds": round(seconds, 1),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return publish_engine(manifest, host_memory, engine, echo)


def publish_engine(manifest: Manifest, host_memory, engine: dict, echo: Callable[[str], None] = print) -> Path:
    """Write the engine and the updated manifest into a work folder beside the artifact (its other files
    hard-linked, not copied) and publish it as export does: the artifact is never half-updated, and an old engine
    stays valid until the new one is in."""
    artifact = manifest.folder
    tmp = make_temp_dir(artifact, ArtifactError)
    try:
        link_files(artifact, tmp, skip={ENGINE, MANIFEST})
        size, digest = _write_engine(host_memory, tmp / ENGINE)
        echo(f"[3/3] write {ENGINE} ({size / 1e6:.1f} MB) after {engine['build_seconds']:.0f} s")
        files = {n: d for n, d in manifest.files.items() if n != ENGINE} | {ENGINE: digest}
        write_manifest(tmp, {**manifest.fields(), "engine": {**engine, "sha256": digest}}, files=files)
        publish(tmp, artifact)
    except OSError as exc:
        raise ArtifactError(f"cannot write the engine beside {artifact} ({exc.strerror}); the artifact is unchanged") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return artifact / ENGINE
