"""Peak memory of `neodeploy export`, summed over its process tree, per stage, against the weight size.

    python scripts/export_memory.py CHECKPOINT [--target portable|cpu] [--precision fp32|fp16]
                                    [--quantize int8|int4] [--interval 0.1]

Runs the export as a user does (a subprocess into a temporary folder), samples the RSS of the export and all
its descendants from /proc every --interval seconds, and attributes each sample to the stage the export printed
last. Linux only (reads /proc)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every descendant (children of children included)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measure(argv: list[str], interval: float = 0.1, env: dict | None = None) -> dict:
    """Run a neodeploy command; return its exit status, wall time, tree peak and per-stage peaks (bytes)."""
    # stderr goes to a file: a pipe read only at exit could fill (tracer warnings) and block the export.
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "neodeploy", *argv], stdout=subprocess.PIPE,
                            stderr=errors, text=True, env={**os.environ, "NEODEPLOY_QUIET": "1", **(env or {})})
    stage = ["start"]
    peaks: dict[str, int] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[") and "]" in line and ":" in line:
                stage[0] = line.split("]", 1)[1].split(":", 1)[0].strip()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.perf_counter()
    while proc.poll() is None:
        now = tree_rss(proc.pid)
        peaks[stage[0]] = max(peaks.get(stage[0], 0), now)
        time.sleep(interval)
    reader.join(timeout=5)
    errors.seek(0)
    return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "peak": max(peaks.values(), default=0),
            "stages": peaks, "stderr": errors.read(), "stdout": "".join(lines)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--target", default="portable")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--quantize")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args()
    from neodeploy.export import memory
    from neodeploy.core.spec import load_spec

    spec = load_spec(args.checkpoint)
    weights, bound = 4 * spec.num_parameters(), memory.need(spec)  # fp32 weight bytes: what the bound is written in
    with tempfile.TemporaryDirectory(dir=args.checkpoint.resolve().parent, prefix=".export-memory-") as tmp:
        argv = ["export", str(args.checkpoint), str(Path(tmp) / "art"), "--target", args.target,
                "--precision", args.precision, *(["--quantize", args.quantize] if args.quantize else []),
                "--no-reference-cache"]
        result = measure(argv, args.interval)
    what = f"{args.target} {args.quantize or args.precision}"
    if args.json:
        print(json.dumps({"export": what, "weights": weights, "bound": bound,
                          **{k: v for k, v in result.items() if k not in ("stdout",)}}))
        return result["rc"]
    print(f"{args.checkpoint.name} {what}: exit {result['rc']}, {result['seconds']:.0f} s, fp32 weights "
          f"{weights / 1e9:.2f} GB, tree peak {result['peak'] / 1e9:.2f} GB = {result['peak'] / weights:.2f}x "
          f"(bound 1.5x + 1.5 GB = {bound / 1e9:.2f} GB: {'ok' if result['peak'] <= bound else 'OVER'})")
    for stage, peak in result["stages"].items():
        print(f"  {stage:<10} {peak / 1e9:6.2f} GB")
    if result["rc"]:
        print(result["stderr"][-2000:], file=sys.stderr)
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
