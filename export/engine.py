"""`neodeploy build-engine`: a TensorRT fp16 engine from an fp16 artifact, with two optimisation profiles.

Written against the TensorRT 10/11 Python API and Polygraphy's loaders; it cannot run on a machine
without an NVIDIA GPU, so everything around it (profiles, lint, manifest) is tested on CPU and the
build itself by GPU-only tests. Precision lives in the graph: TensorRT >= 10.12 parses it into a
strongly typed network (the only mode of TensorRT 11), so the Casts of the fp32 islands are obeyed;
older TensorRT builds with the FP16 flag and pins the fp32 layers explicitly.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from neodeploy.errors import ArtifactError, UsageError
from neodeploy.files import sha256
from neodeploy.profiles import DeploymentProfile, load_profile, trt_profiles
from neodeploy.runtime.gpu import gpu_info, import_tensorrt
from neodeploy.runtime.manifest import MANIFEST, read_manifest, verify_files

ENGINE = "model.engine"
STRONGLY_TYPED_SINCE = (10, 12)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _pin_fp32_islands(network, trt) -> int:
    """Weakly typed fallback (TensorRT < 10.12): keep every layer the graph computes in fp32 in fp32."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE, trt.LayerType.CAST):
            continue
        outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if outputs and all(o.dtype == trt.float32 for o in outputs):
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned += 1
    return pinned


def _heartbeat(echo: Callable[[str], None], stop: threading.Event, start: float) -> None:
    while not stop.wait(30):
        echo(f"      still building ... {time.perf_counter() - start:.0f} s")


def build_engine(artifact: str | Path, profile: str | Path, *, timing_cache: str | Path | None = None,
                 opt_level: int = 3, workspace_gib: float | None = None, echo: Callable[[str], None] = print) -> Path:
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    deployment: DeploymentProfile = load_profile(profile)
    shapes = trt_profiles(deployment, manifest)  # refuses a profile that does not fit, before any GPU work
    if manifest["precision"] != "fp16":
        raise UsageError(f"{artifact} is an {manifest['precision']} export; TensorRT engines are built from fp16 "
                         "exports: run neodeploy export --precision fp16")
    if manifest["onnx"].get("target", "portable") != "portable":
        raise UsageError(f"{artifact} is a CPU-target export (onnxruntime-only fused ops); build engines from the "
                         "portable export: neodeploy export --precision fp16")
    if not 0 <= opt_level <= 5:
        raise UsageError(f"--opt-level must be 0..5, got {opt_level}")
    onnx_file = artifact / manifest["onnx"]["file"]
    verify_files(artifact, manifest, [manifest["onnx"]["file"], manifest["onnx"]["external_data"]])
    trt = import_tensorrt()
    gpu = gpu_info()
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException
    except ImportError as exc:
        raise UsageError(f"build-engine needs polygraphy ({exc}): pip install 'neodeploy[trt]'") from exc

    version = trt.__version__
    strongly_typed = _version_tuple(version) >= STRONGLY_TYPED_SINCE
    echo(f"[1/3] parse {onnx_file.name} with TensorRT {version} on {gpu['name']} (sm {gpu['compute_capability']}), "
         f"{'strongly typed' if strongly_typed else 'FP16 flag with fp32 islands pinned'}")
    if strongly_typed:
        network = NetworkFromOnnxPath(str(onnx_file), strongly_typed=True)
    else:
        def network():
            builder, net, parser = NetworkFromOnnxPath(str(onnx_file))()
            echo(f"      pinned {_pin_fp32_islands(net, trt)} fp32 layers")
            return builder, net, parser

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
        fp16=not strongly_typed,
        precision_constraints=None if strongly_typed else "obey",
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
        # IHostMemory (buffer protocol, no len()): copy it out once.
        engine_bytes = bytes(EngineBytesFromNetwork(network, config=config,
                                                    save_timing_cache=str(cache) if cache else None)())
    except PolygraphyException as exc:
        raise ArtifactError(f"TensorRT could not build the engine ({str(exc).splitlines()[0]}); "
                            f"run neodeploy lint {artifact} --profile {deployment.name}") from exc
    finally:
        stop.set()
    seconds = time.perf_counter() - start
    echo(f"[3/3] write {ENGINE} ({len(engine_bytes) / 1e6:.1f} MB) after {seconds:.0f} s")
    tmp = artifact / f".{ENGINE}.tmp"
    tmp.write_bytes(engine_bytes)
    os.replace(tmp, artifact / ENGINE)
    manifest["engine"] = {
        "file": ENGINE,
        "sha256": sha256(artifact / ENGINE),
        "tensorrt_version": version,
        "gpu": gpu,
        "strongly_typed": strongly_typed,
        "optimization_level": opt_level,
        "profile": {"name": deployment.name, "description": deployment.description,
                    "batch": vars(deployment.batch), "prompt": vars(deployment.prompt), "context": vars(deployment.context)},
        "optimization_profiles": {name: {t: [list(s) for s in v] for t, v in inputs.items()} for name, inputs in shapes.items()},
        "build_seconds": round(seconds, 1),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["files"][ENGINE] = manifest["engine"]["sha256"]
    tmp_manifest = artifact / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, artifact / MANIFEST)
    return artifact / ENGINE
