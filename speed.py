"""`neodeploy bench`: prefill latency, decode ms/token, tokens/s and memory of the runtime and its peers,
measured on the same inputs in the same run: systems alternate within every repeat (the machine is shared
and noisy, so only ratios within one run mean anything), after a warm-up; medians and spread.

Peers, each skipped with a note when not installed: the PyTorch reference, transformers (its default
attention), Optimum's ORTModelForCausalLM on Optimum's own export of the same checkpoint (torch pinned to one
thread while it runs: torch's glue beside onnxruntime oversubscribes the cores) and on that export quantised by
Optimum's ORTQuantizer to dynamic int8 (`optimum-int8`), and llama.cpp through
llama-cpp-python on a GGUF of the same checkpoint (`--compare llama.cpp --gguf FILE`; batch 1 only; GPT-NeoX
only, llama.cpp has no GPT-Neo). Every row reports its decode time against its own memory roof: the weight bytes
that system reads per token divided by the machine's read bandwidth, measured with a read-only kernel.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neodeploy.core.errors import UsageError

if TYPE_CHECKING:
    from neodeploy.core.manifest import Manifest

SYSTEMS = ("neodeploy", "reference", "transformers", "optimum", "optimum-int8", "llama.cpp")
DEFAULT_PEERS = ("reference", "transformers", "optimum")  # llama.cpp only when asked: it needs a GGUF


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 1e6
    except OSError:  # not Linux
        return float("nan")


def cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """Bytes read per second by a read-only kernel: an OR-reduction over 64-bit words of arrays far larger than
    the caches (one cheap op per 8 bytes, so memory, not arithmetic, limits it; a float sum measured ~25 % lower
    here), one thread per core at once (numpy releases the GIL in reductions), as decode's threads read the
    weights; best of a few. A copy would write as much as it reads and understate the roof."""
    import concurrent.futures

    workers = cores()
    arrays = [np.ones(nbytes // 8 // workers, np.uint64) for _ in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        def read_all():
            list(pool.map(np.bitwise_or.reduce, arrays))

        read_all()
        best = min(_timed(read_all) for _ in range(repeat))
    return nbytes / best / 1e9


def checkpoint_bytes_per_token(spec) -> int:
    """Weight bytes one fp32 decode step of the checkpoint reads (PyTorch, Optimum): every weight but the
    input embeddings, of which a lookup reads one row (a tied embedding is read whole, as the head)."""
    skip = 0 if spec.tied_embeddings else spec.vocab_size * spec.hidden_size
    if spec.family == "gpt_neo":
        skip += spec.max_positions * spec.hidden_size
    return 4 * (spec.num_parameters() - skip)


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one llama.cpp decode step reads: every tensor of the GGUF but the token embedding (read
    with the `gguf` package, which llama.cpp's converter needs anyway; else the file size, an overestimate)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return path.stat().st_size
    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Runner:
    """Greedy prefill then decode steps, with the system's own cache handling."""

    name = ""
    max_batch: int | None = None
    bytes_per_token = 0

    def prefill(self, ids: np.ndarray) -> None: ...

    def step(self) -> None: ...


class NeodeployRunner(Runner):
    name = "neodeploy"

    def __init__(self, artifact: Path, backend: str | None = None, new_tokens: int = 64, threads: int | None = None):
        from neodeploy.runtime import load

        self.model = load(artifact, backend=backend, threads=threads)
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
    """Optimum's ORTModelForCausalLM on Optimum's own export; with `quantize`, that export quantised by Optimum's
    ORTQuantizer to dynamic int8 per output channel, the scheme of our --quantize int8 (`optimum-int8`)."""

    name = "optimum"

    def __init__(self, checkpoint: Path, workdir: Path, quantize: bool = False):
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        export_dir = workdir / "optimum-export"
        if not (export_dir / "model.onnx").is_file():
            ORTModelForCausalLM.from_pretrained(str(checkpoint), export=True).save_pretrained(export_dir)
        model_dir, file_name = export_dir, "model.onnx"
        if quantize:
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            self.name, model_dir, file_name = "optimum-int8", workdir / "optimum-int8", "model_quantized.onnx"
            if not (model_dir / file_name).is_file():
                config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
                ORTQuantizer.from_pretrained(export_dir, file_name="model.onnx").quantize(
                    save_dir=model_dir, quantization_config=config)
            self.bytes_per_token = graph_bytes_per_token(model_dir / file_name)
        self.model = ORTModelForCausalLM.from_pretrained(model_dir, file_name=file_name, use_cache=True)

    def _one_torch_thread(self, fn):
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            fn()
        finally:
            self.torch.set_num_threads(threads)

    def prefill(self, ids):
        self._one_torch_thread(lambda: self._prefill(ids))

    def step(self):
        self._one_torch_thread(self._step)

    def _prefill(self, ids):
        self.mask = self.torch.ones(ids.shape, dtype=self.torch.long)
        out = self.model(input_ids=self.torch.from_numpy(ids), attention_mask=self.mask, use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def _step(self):
        self.mask = self.torch.cat([self.mask, self.torch.ones_like(self.token)], dim=1)
        position = self.torch.full(self.token.shape, self.mask.shape[1] - 1, dtype=self.torch.long)
        out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=position,
                         past_key_values=self.past, use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python: the same prompt ids, greedy, the same thread count, batch 1."""

    name = "llama.cpp"
    max_batch = 1

    def __init__(self, gguf: Path, context: int, threads: int):
        try:
            import llama_cpp
        except ImportError as exc:
            raise ImportError("llama-cpp-python is not installed (it compiles llama.cpp, 20+ minutes: see the "
                              "README's speed section for building it once)") from exc
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} not found")
        # n_batch = n_ctx: the whole prompt in one batch, and llama-cpp-python keeps the last logits at row
        # n_tokens - 1 of a buffer of n_batch rows.
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.bytes_per_token = gguf_bytes_per_token(gguf)

    def _greedy(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids[0]])
        self.token = self._greedy()

    def step(self):
        self.llm.eval([self.token])
        self.token = self._greedy()


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class SystemResult:
    """One system at one batch size: medians and spread over the repeats, against its own memory roof."""
    system: str
    batch: int
    prefill_ms: Spread
    decode_ms_per_token: Spread
    tokens_per_s: float
    memory_mb: float
    weight_bytes_per_token: int
    roof_ms_per_token: float | None
    decode_x_roof: float | None
    new_tokens: int


@dataclass(frozen=True)
class Speedup:
    decode_speedup: float
    prefill_speedup: float


@dataclass(frozen=True)
class Skipped:
    system: str
    reason: str


@dataclass(frozen=True)
class ModelShape:
    family: str
    layers: int
    hidden: int


@dataclass(frozen=True)
class BenchConfig:
    batches: list[int]
    prompt: int
    new_tokens: int
    repeat: int
    threads: int


@dataclass(frozen=True)
class Machine:
    read_bandwidth_gbs: float  # the median of the samples: what the roofs use
    read_bandwidth_samples_gbs: list[float]
    cpu_count: int


@dataclass(frozen=True)
class Weights:
    bytes_per_token: int  # ours, from the graph
    roof_ms_per_token: float


@dataclass(frozen=True)
class BenchReport:
    """What `bench` measured; `to_dict` is the JSON `--json` writes."""
    artifact: str
    checkpoint: str
    precision: str
    model: ModelShape
    config: BenchConfig
    machine: Machine
    weights: Weights
    results: list[SystemResult]
    ratios_vs_peers: dict[str, dict[str, Speedup]]  # peer -> batch (as text, a JSON key) -> ours vs theirs
    skipped: list[Skipped]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    system: str
    batch: int
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    memory_mb: float = float("nan")
    bytes_per_token: int = 0

    def summary(self, new_tokens: int, bandwidth_gbs: float) -> SystemResult:
        decode = statistics.median(self.decode_ms)
        roof_ms = self.bytes_per_token / (bandwidth_gbs * 1e9) * 1e3 if self.bytes_per_token else None
        return SystemResult(
            system=self.system, batch=self.batch,
            prefill_ms=Spread.of(self.prefill_ms), decode_ms_per_token=Spread.of(self.decode_ms),
            tokens_per_s=self.batch * 1000.0 / decode,
            memory_mb=self.memory_mb,
            weight_bytes_per_token=self.bytes_per_token,
            roof_ms_per_token=roof_ms,
            decode_x_roof=decode / roof_ms if roof_ms else None,
            new_tokens=new_tokens,
        )


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
        return graph_bytes_per_token(artifact / manifest.onnx.file)
    except ImportError:
        spec = manifest.spec
        total = (artifact / manifest.onnx.external_data).stat().st_size
        if not spec.tied_embeddings:
            total -= spec.vocab_size * spec.hidden_size * (2 if manifest.dtype == "fp16" else 4)
        return max(total, 0)


def graph_bytes_per_token(path: Path) -> int:
    """Bytes of every initializer of an ONNX graph that a decode step reads: all but those only a lookup (Gather,
    or the quantised embedding's GatherBlockQuantized) reads, which touches one row per token."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        ops = consumers.get(tensor.name, set())
        if not ops or ops <= {"Gather", "GatherBlockQuantized"}:
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
          gguf: str | Path | None = None, threads: int | None = None, echo=print) -> BenchReport:
    from neodeploy.core.manifest import read_manifest, verify_files

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    verify_files(manifest, [manifest.onnx.file, manifest.onnx.external_data])  # the graph is read before load
    compare = list(compare if compare is not None else DEFAULT_PEERS)
    unknown = [s for s in compare if s not in SYSTEMS]
    if unknown:
        raise UsageError(f"unknown system {unknown[0]!r} in --compare; choose from {', '.join(SYSTEMS[1:])}")
    if prompt < 1 or new_tokens < 2 or repeat < 1 or not batches or min(batches) < 1:
        raise UsageError("--prompt >= 1, --new-tokens >= 2, --repeat >= 1 and batches >= 1 are required")
    if "llama.cpp" in compare and gguf is None:
        raise UsageError("--compare llama.cpp needs --gguf FILE, a GGUF of the same checkpoint (the README's speed "
                         "section shows how to convert one)")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UsageError(f"--threads must be at least 1, got {threads}")
    threads = threads or cores()
    if prompt + new_tokens > manifest.max_context:
        raise UsageError(f"--prompt + --new-tokens exceeds the artifact's context of {manifest.max_context}")
    source = manifest.data.get("source")
    if checkpoint is None and not (isinstance(source, dict) and isinstance(source.get("checkpoint"), str)):
        raise UsageError(f"{artifact}'s manifest does not say which checkpoint it came from; pass --checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise UsageError(f"--checkpoint {checkpoint} does not exist (or is not a folder)")
    checkpoint = Path(checkpoint or source["checkpoint"])
    per_token = weight_bytes_per_token(artifact, manifest)  # ours, from the graph
    skipped: list[Skipped] = []
    runners: dict[str, Runner] = {}
    memory: dict[str, float] = {}
    scratch = tempfile.TemporaryDirectory(prefix="neodeploy-bench-")  # Optimum's export; removed at the end
    workdir = Path(scratch.name)
    for name in ["neodeploy", *compare]:
        before = _rss_mb()
        try:
            if name == "neodeploy":
                runners[name] = NeodeployRunner(artifact, new_tokens=new_tokens, threads=threads)
            elif name == "llama.cpp":
                runners[name] = LlamaCppRunner(Path(gguf), prompt + new_tokens, threads)
            elif not checkpoint.is_dir():
                raise FileNotFoundError(f"checkpoint {checkpoint}, named in the artifact's manifest, is not here "
                                        "(pass --checkpoint)")
            elif name == "reference":
                runners[name] = ReferenceRunner(checkpoint)
            elif name == "transformers":
                runners[name] = TransformersRunner(checkpoint)
            else:
                runners[name] = OptimumRunner(checkpoint, workdir, quantize=name == "optimum-int8")
        except (ImportError, FileNotFoundError) as exc:
            skipped.append(Skipped(name, str(exc).splitlines()[0]))
            echo(f"skipping {name}: {str(exc).splitlines()[0]}")
            continue
        grown = _rss_mb() - before  # RSS growth while it loaded; a collection of earlier garbage can undercut it
        memory[name] = grown if grown > 0 else float("nan")
        runner = runners[name]
        if not runner.bytes_per_token:  # llama.cpp's comes from its GGUF
            runner.bytes_per_token = per_token if name == "neodeploy" else checkpoint_bytes_per_token(manifest.spec)
    # This machine's bandwidth moves by tens of per cent over minutes: it is measured before, once per repeat and
    # after the runs, and the roof uses the median (one measurement at a fast or slow moment moved every x roof).
    bandwidths = [read_bandwidth_gbs()]
    rng = np.random.default_rng(0)
    vocab = manifest.spec.vocab_size
    results: list[Result] = []
    for batch in batches:
        ids = rng.integers(0, vocab, size=(batch, prompt), dtype=np.int64)
        running = {n: r for n, r in runners.items() if r.max_batch is None or batch <= r.max_batch}
        for name in runners.keys() - running.keys():
            skipped.append(Skipped(name, f"batch {batch}: runs batch {runners[name].max_batch} only"))
        batch_results = {name: Result(name, batch, memory_mb=memory[name], bytes_per_token=r.bytes_per_token)
                         for name, r in running.items()}
        for runner in running.values():  # warm-up
            _run_once(runner, ids, min(new_tokens, 4))
        order = list(running)
        for r in range(repeat):
            bandwidths.append(read_bandwidth_gbs())
            for name in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                time.sleep(0.05)  # let the previous system's spinning worker threads go idle first
                prefill_ms, decode_ms = _run_once(running[name], ids, new_tokens)
                batch_results[name].prefill_ms.append(prefill_ms)
                batch_results[name].decode_ms.append(decode_ms)
            echo(f"  batch {batch}: repeat {r + 1}/{repeat} done")
        results.extend(batch_results.values())
    for runner in runners.values():
        getattr(getattr(runner, "backend", None), "close", lambda: None)()
    runners.clear()
    scratch.cleanup()
    bandwidths.append(read_bandwidth_gbs())
    bandwidth = statistics.median(bandwidths)
    roof_ms = per_token / (bandwidth * 1e9) * 1e3
    summaries = [r.summary(new_tokens, bandwidth) for r in results]
    ratios: dict[str, dict[str, Speedup]] = {}
    for batch in batches:
        by = {s.system: s for s in summaries if s.batch == batch}
        ours = by.get("neodeploy")
        for peer in by:
            if peer != "neodeploy" and ours:
                ratios.setdefault(peer, {})[str(batch)] = Speedup(
                    decode_speedup=by[peer].decode_ms_per_token.median / ours.decode_ms_per_token.median,
                    prefill_speedup=by[peer].prefill_ms.median / ours.prefill_ms.median,
                )
    spec = manifest.spec
    return BenchReport(
        artifact=str(artifact), checkpoint=str(checkpoint), precision=manifest.precision,
        model=ModelShape(spec.family, spec.num_layers, spec.hidden_size),
        config=BenchConfig(list(batches), prompt, new_tokens, repeat, threads),
        machine=Machine(bandwidth, bandwidths, cores()),
        weights=Weights(per_token, roof_ms),
        results=summaries, ratios_vs_peers=ratios, skipped=skipped,
    )


def speed_table(report: BenchReport) -> str:
    lines = [f"{'system':<13} {'batch':>5} {'prefill ms':>18} {'decode ms/token':>20} {'tok/s':>8} {'x roof':>8} "
             f"{'MB/token':>8} {'mem MB':>8}"]
    for s in report.results:
        p, d = s.prefill_ms, s.decode_ms_per_token
        lines.append(f"{s.system:<13} {s.batch:>5} {p.median:>8.1f} [{p.min:.0f}-{p.max:.0f}]".ljust(38)
                     + f" {d.median:>8.2f} [{d.min:.1f}-{d.max:.1f}]".ljust(21)
                     + f" {s.tokens_per_s:>8.1f} "
                     + (f"{s.decode_x_roof:>8.2f}" if s.decode_x_roof else f"{'n/a':>8}")
                     + f" {s.weight_bytes_per_token / 1e6:>8.0f} {s.memory_mb:>8.0f}")
    w = report.weights
    lines.append(f"read bandwidth {report.machine.read_bandwidth_gbs:.1f} GB/s (read-only kernel, "
                 f"{report.config.threads} threads, median of before, each repeat and after); "
                 f"roof = weight bytes read per token / bandwidth: ours "
                 f"{w.bytes_per_token / 1e6:.0f} MB, {w.roof_ms_per_token:.1f} ms/token")
    for peer, by_batch in report.ratios_vs_peers.items():
        for batch, r in by_batch.items():
            lines.append(f"neodeploy vs {peer}, batch {batch}: decode {r.decode_speedup:.2f}x, prefill {r.prefill_speedup:.2f}x")
    for s in report.skipped:
        lines.append(f"skipped {s.system}: {s.reason}")
    return "\n".join(lines)


def plot(report: BenchReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from exc
    systems = list(dict.fromkeys(s.system for s in report.results))
    batches = report.config.batches
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        # A system may lack a batch (llama.cpp runs batch 1 only): it gets no bar there.
        found = [(i, next((s for s in report.results if s.system == system and s.batch == b), None))
                 for i, b in enumerate(batches)]
        rows = [r for _, r in found if r is not None]
        x = np.array([i for i, r in found if r is not None]) + k * width
        for ax, key in zip(axes, ("decode_ms_per_token", "prefill_ms")):
            med = [getattr(r, key).median for r in rows]
            err = [[m - getattr(r, key).min for m, r in zip(med, rows)], [getattr(r, key).max - m for m, r in zip(med, rows)]]
            ax.bar(x, med, width, yerr=err, capsize=3, label=system)
    roof = report.weights.roof_ms_per_token
    axes[0].axhline(roof, color="black", linestyle="--", linewidth=1, label=f"our memory roof ({roof:.1f} ms)")
    for ax, title in zip(axes, ("decode ms / token (lower is better)", "prefill ms (lower is better)")):
        ax.set_xticks(np.arange(len(batches)) + width * (len(systems) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    m, c = report.model, report.config
    fig.suptitle(f"{m.family} {m.layers}x{m.hidden} ({report.precision}), prompt {c.prompt}, "
                 f"{c.new_tokens} new tokens, median of {c.repeat} (bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, report: BenchReport) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
