"""How much memory an export needs, said up front from the ModelSpec, and what this machine has. Torch-free
(`inspect --preset` uses it).

Every stage that holds a whole model runs in its own child process (reference, trace, fuse, quantize), reads
weights on demand where its tool allows, and gives its memory back when it exits, so the export's peak, summed
over its process tree, stays within NEED_FACTOR x the checkpoint's fp32 weight bytes + NEED_BASE (tests assert
it at a small preset; scripts/export_memory.py measures it at pythia-410m and 1b)."""

from __future__ import annotations

NEED_FACTOR = 1.5
NEED_BASE = 1.5e9  # Python, torch, onnx and onnxruntime in a parent and one child


def need(spec) -> int:
    """Peak bytes of an export of `spec`, any target and precision."""
    return int(NEED_FACTOR * 4 * spec.num_parameters() + NEED_BASE)


def available() -> int | None:
    """Bytes this process may still use: MemAvailable, or a lower cgroup (container) limit; None if unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(path) as f, open(used) as g:
                limit = f.read().strip()
                if limit.isdigit() and int(limit) < 1 << 60:
                    limits.append(int(limit) - int(g.read().strip()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check(spec, max_memory: int | None, error: type[Exception]) -> None:
    """Refuse, before any work, an export this machine cannot hold; `max_memory` overrides what is detected."""
    want, have = need(spec), max_memory if max_memory is not None else available()
    if have is not None and want > have:
        source = "--max-memory" if max_memory is not None else "available memory"
        raise error(f"this export needs about {want / 1e9:.1f} GB of memory ({NEED_FACTOR:g} x the "
                    f"{4 * spec.num_parameters() / 1e9:.1f} GB of fp32 weights + {NEED_BASE / 1e9:g} GB) but {source} "
                    f"is {have / 1e9:.1f} GB; free memory, use a larger "
                    "machine, or pass --max-memory SIZE (e.g. 32GB) to try anyway")
