"""`neodeploy bench`: prefill latency, decode ms/token, tokens/s and memory of the runtime and its peers,
measured on the same inputs in the same run: systems alternate within every repeat (the machine is shared
and noisy, so only ratios within one run mean anything), after a warm-up; medians and spread.

Peers, each skipped with a note when not installed: the PyTorch reference, transformers (its default
attention), and Optimum's ORTModelForCausalLM on Optimum's own export of the same checkpoint.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neodeploy.errors import UsageError

if TYPE_CHECKING:
    from neodeploy.runtime.manifest import Manifest

SYSTEMS = ("neodeploy", "reference", "transformers", "optimum")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 1e6
    except OSError:  # not Linux
        return float("nan")


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Bytes copied per second by large memcpys (numpy, one per core at once, as the runtime's threads read),
    best of a few: the memory roof for decode."""
    import concurrent.futures
    import os

    workers = max(1, os.cpu_count() or 1)
    src = [np.ones(nbytes // 8 // workers) for _ in range(workers)]
    dst = [np.empty_like(a) for a in src]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        def copy_all():
            list(pool.map(lambda k: np.copyto(dst[k], src[k]), range(workers)))

        copy_all()
        best = min(_timed(copy_all) for _ in range(repeat))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Runner:
    """Greedy prefill then decode steps, with the system's own cache handling."""

    name = ""

    def prefill(self, ids: np.ndarray) -> None: ...

    def step(self) -> None: ...


class NeodeployRunner(Runner):
    name = "neodeploy"

    def __init__(self, artifact: Path, backend: str | None = None, new_tokens: int = 64):
        from neodeploy.runtime import load

        self.model = load(artifact, backend=backend)
        self.backend, self.new_tokens = self.model.backend, new_tokens

    def prefill(self, ids):
        from neodeploy.runtime.batch import DecodeBatch

        # As generate() does: the cache is sized for the prompt and the tokens to come.
        self.batch = DecodeBatch(self.backend)
        self.token = self.batch.start(ids, np.ones_like(ids), capacity=ids.shape[1] + self.new_tokens).argmax(-1)

    def step(self):
        self.token = self.batch.step(self.token).argmax(-1)


class ReferenceRunner(Runner):
    name = "reference"

    def __init__(self, checkpoint: Path):
        import torch

        from neodeploy.reference import load_checkpoint

        self.torch, self.model = torch, load_checkpoint(checkpoint)

    def prefill(self, ids):
        with self.torch.inference_mode():
            logits, self.past = self.model(self.torch.from_numpy(ids))
            self.token = logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        with self.torch.inference_mode():
            logits, self.past = self.model(self.token, past_key_values=self.past)
            self.token = logits[:, -1].argmax(-1, keepdim=True)


class TransformersRunner(Runner):
    name = "transformers"

    def __init__(self, checkpoint: Path):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def prefill(self, ids):
        with self.torch.inference_mode():
            self.mask = self.torch.ones(ids.shape, dtype=self.torch.long)
            out = self.model(input_ids=self.torch.from_numpy(ids), attention_mask=self.mask, use_cache=True)
            self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        with self.torch.inference_mode():
            self.mask = self.torch.cat([self.mask, self.torch.ones_like(self.token)], dim=1)
            out = self.model(input_ids=self.token, attention_mask=self.mask, past_key_values=self.past, use_cache=True)
            self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


class OptimumRunner(Runner):
    name = "optimum"

    def __init__(self, checkpoint: Path, workdir: Path):
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        export_dir = workdir / "optimum-export"
        if not (export_dir / "model.onnx").is_file():
            ORTModelForCausalLM.from_pretrained(str(checkpoint), export=True).save_pretrained(export_dir)
        self.model = ORTModelForCausalLM.from_pretrained(export_dir, use_cache=True)

    def prefill(self, ids):
        self.mask = self.torch.ones(ids.shape, dtype=self.torch.long)
        out = self.model(input_ids=self.torch.from_numpy(ids), attention_mask=self.mask, use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        self.mask = self.torch.cat([self.mask, self.torch.ones_like(self.token)], dim=1)
        position = self.torch.full(self.token.shape, self.mask.shape[1] - 1, dtype=self.torch.long)
        out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=position,
                         past_key_values=self.past, use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


@dataclass
class Result:
    system: str
    batch: int
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    memory_mb: float = float("nan")

    def summary(self, new_tokens: int, floor_ms: float) -> dict:
        def stats(values):
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        decode = statistics.median(self.decode_ms)
        return {
            "system": self.system, "batch": self.batch,
            "prefill_ms": stats(self.prefill_ms), "decode_ms_per_token": stats(self.decode_ms),
            "tokens_per_s": self.batch * 1000.0 / decode,
            "memory_mb": self.memory_mb,
            "decode_x_floor": decode / floor_ms if floor_ms else None,
            "new_tokens": new_tokens,
        }


def _run_once(runner: Runner, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    prefill = _timed(lambda: runner.prefill(ids))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        runner.step()
    return prefill * 1e3, (time.perf_counter() - start) * 1e3 / max(new_tokens - 1, 1)


def weight_bytes_per_token(artifact: Path, manifest: Manifest) -> int:
    """Bytes of weights one decode step reads: every initializer except those only a Gather consumes (an
    embedding lookup reads one row per token). Falls back to the data file less the input embedding when
    onnx is not installed."""
    try:
        import onnx
    except ImportError:
        spec = manifest.spec
        total = (artifact / manifest.onnx.external_data).stat().st_size
        if not spec.tied_embeddings:
            total -= spec.vocab_size * spec.hidden_size * (2 if manifest.dtype == "fp16" else 4)
        return max(total, 0)
    model = onnx.load(str(artifact / manifest.onnx.file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        ops = consumers.get(tensor.name, set())
        if not ops or ops == {"Gather"}:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        if "length" in external:
            total += int(external["length"])
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def bench(artifact: str | Path, checkpoint: str | Path | None = None, compare: list[str] | None = None,
          batches: list[int] = (1,), prompt: int = 128, new_tokens: int = 64, repeat: int = 5,
          echo=print) -> dict:
    from neodeploy.runtime.manifest import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    compare = list(compare if compare is not None else SYSTEMS[1:])
    unknown = [s for s in compare if s not in SYSTEMS]
    if unknown:
        raise UsageError(f"unknown system {unknown[0]!r} in --compare; choose from {', '.join(SYSTEMS[1:])}")
    if prompt < 1 or new_tokens < 2 or repeat < 1 or not batches or min(batches) < 1:
        raise UsageError("--prompt >= 1, --new-tokens >= 2, --repeat >= 1 and batches >= 1 are required")
    if prompt + new_tokens > manifest.max_context:
        raise UsageError(f"--prompt + --new-tokens exceeds the artifact's context of {manifest.max_context}")
    source = manifest.data.get("source")
    if checkpoint is None and not (isinstance(source, dict) and isinstance(source.get("checkpoint"), str)):
        raise UsageError(f"{artifact}'s manifest does not say which checkpoint it came from; pass --checkpoint")
    checkpoint = Path(checkpoint or source["checkpoint"])
    skipped: list[dict] = []
    runners: dict[str, Runner] = {}
    memory: dict[str, float] = {}
    scratch = tempfile.TemporaryDirectory(prefix="neodeploy-bench-")  # Optimum's export; removed at the end
    workdir = Path(scratch.name)
    for name in ["neodeploy", *compare]:
        before = _rss_mb()
        try:
            if name == "neodeploy":
                runners[name] = NeodeployRunner(artifact, new_tokens=new_tokens)
            elif not checkpoint.is_dir():
                raise FileNotFoundError(f"checkpoint {checkpoint} not found (pass --checkpoint)")
            elif name == "reference":
                runners[name] = ReferenceRunner(checkpoint)
            elif name == "transformers":
                runners[name] = TransformersRunner(checkpoint)
            else:
                runners[name] = OptimumRunner(checkpoint, workdir)
        except (ImportError, FileNotFoundError) as exc:
            skipped.append({"system": name, "reason": str(exc).splitlines()[0]})
            echo(f"skipping {name}: {str(exc).splitlines()[0]}")
            continue
        memory[name] = _rss_mb() - before
    bandwidth = copy_bandwidth_gbs()
    per_token = weight_bytes_per_token(artifact, manifest)
    floor_ms = per_token / (bandwidth * 1e9) * 1e3
    rng = np.random.default_rng(0)
    vocab = manifest.spec.vocab_size
    results: list[Result] = []
    for batch in batches:
        ids = rng.integers(0, vocab, size=(batch, prompt), dtype=np.int64)
        batch_results = {name: Result(name, batch, memory_mb=memory[name]) for name in runners}
        for runner in runners.values():  # warm-up
            _run_once(runner, ids, min(new_tokens, 4))
        order = list(runners)
        for r in range(repeat):
            for name in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                prefill_ms, decode_ms = _run_once(runners[name], ids, new_tokens)
                batch_results[name].prefill_ms.append(prefill_ms)
                batch_results[name].decode_ms.append(decode_ms)
            echo(f"  batch {batch}: repeat {r + 1}/{repeat} done")
        results.extend(batch_results.values())
    for runner in runners.values():
        getattr(getattr(runner, "backend", None), "close", lambda: None)()
    runners.clear()
    scratch.cleanup()
    summaries = [r.summary(new_tokens, floor_ms) for r in results]
    ratios = {}
    for batch in batches:
        by = {s["system"]: s for s in summaries if s["batch"] == batch}
        ours = by.get("neodeploy")
        for peer in by:
            if peer != "neodeploy" and ours:
                ratios.setdefault(peer, {})[str(batch)] = {
                    "decode_speedup": by[peer]["decode_ms_per_token"]["median"] / ours["decode_ms_per_token"]["median"],
                    "prefill_speedup": by[peer]["prefill_ms"]["median"] / ours["prefill_ms"]["median"],
                }
    return {
        "artifact": str(artifact), "checkpoint": str(checkpoint), "precision": manifest.precision,
        "model": {"family": manifest.spec.family, "layers": manifest.spec.num_layers,
                  "hidden": manifest.spec.hidden_size},
        "config": {"batches": list(batches), "prompt": prompt, "new_tokens": new_tokens, "repeat": repeat},
        "machine": {"copy_bandwidth_gbs": bandwidth, "cpu_count": __import__("os").cpu_count()},
        "weights": {"bytes_per_token": per_token, "floor_ms_per_token": floor_ms},
        "results": summaries, "ratios_vs_peers": ratios, "skipped": skipped,
    }


def table(report: dict) -> str:
    lines = [f"{'system':<13} {'batch':>5} {'prefill ms':>18} {'decode ms/token':>20} {'tok/s':>8} {'x floor':>8} {'mem MB':>8}"]
    for s in report["results"]:
        p, d = s["prefill_ms"], s["decode_ms_per_token"]
        lines.append(f"{s['system']:<13} {s['batch']:>5} {p['median']:>8.1f} [{p['min']:.0f}-{p['max']:.0f}]".ljust(38)
                     + f" {d['median']:>8.2f} [{d['min']:.1f}-{d['max']:.1f}]".ljust(21)
                     + f" {s['tokens_per_s']:>8.1f} "
                     + (f"{s['decode_x_floor']:>8.2f}" if s["decode_x_floor"] else f"{'n/a':>8}")
                     + f" {s['memory_mb']:>8.0f}")
    w = report["weights"]
    lines.append(f"weights read per token {w['bytes_per_token'] / 1e6:.0f} MB at {report['machine']['copy_bandwidth_gbs']:.1f} GB/s "
                 f"copy bandwidth: floor {w['floor_ms_per_token']:.1f} ms/token")
    for peer, by_batch in report["ratios_vs_peers"].items():
        for batch, r in by_batch.items():
            lines.append(f"neodeploy vs {peer}, batch {batch}: decode {r['decode_speedup']:.2f}x, prefill {r['prefill_speedup']:.2f}x")
    for s in report["skipped"]:
        lines.append(f"skipped {s['system']}: {s['reason']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from exc
    systems = list(dict.fromkeys(s["system"] for s in report["results"]))
    batches = report["config"]["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        rows = [next(s for s in report["results"] if s["system"] == system and s["batch"] == b) for b in batches]
        x = np.arange(len(batches)) + k * width
        for ax, key in zip(axes, ("decode_ms_per_token", "prefill_ms")):
            med = [r[key]["median"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
            ax.bar(x, med, width, yerr=err, capsize=3, label=system)
    floor = report["weights"]["floor_ms_per_token"]
    axes[0].axhline(floor, color="black", linestyle="--", linewidth=1, label=f"bandwidth floor ({floor:.1f} ms)")
    for ax, title in zip(axes, ("decode ms / token (lower is better)", "prefill ms (lower is better)")):
        ax.set_xticks(np.arange(len(batches)) + width * (len(systems) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    m = report["model"]
    fig.suptitle(f"{m['family']} {m['layers']}x{m['hidden']} ({report['precision']}), prompt {report['config']['prompt']}, "
                 f"{report['config']['new_tokens']} new tokens, median of {report['config']['repeat']} (bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
