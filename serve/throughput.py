"""`neodeploy bench-serve`: a fixed request set against an OpenAI-compatible server at several concurrencies.

Generated tokens/s, time to first token and inter-token latency (p50 / p99) per concurrency, against our own
server (started here on 127.0.0.1 unless --url names one: llama.cpp's server or any other peer is measured with
the same client), and, in the same alternating run, the baseline: the same requests as concurrent threads
calling `Model.generate` on one loaded model (what embedding the runtime did before the engine). `--compare vllm`
adds vLLM's CPU server on the artifact's own checkpoint, started through its peer script and measured with the
same client on the same requests, alternating with ours level by level (skipped, with the reason, where the peer is
not set up or cannot serve the model). Before each measured level it waits until the machine is quiet, so no system
is charged for the work of the one measured before it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neodeploy.core.errors import UsageError


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _summary(name: str, concurrency: int, wall: float, records: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft"] for r in records]
    itl = [g for r in records for g in r["gaps"]]
    return {"system": name, "concurrency": concurrency, "requests": len(records), "tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(_pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1e3, 1),
            "itl_p50_ms": round(_pct(itl, 50) * 1e3, 2), "itl_p99_ms": round(_pct(itl, 99) * 1e3, 2)}


async def _one(client, url: str, model: str, prompt: list[int], new_tokens: int, headers: dict) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise UsageError(f"{url} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                choice = (event.get("choices") or [{}])[0]
                # One chunk per token (ours and llama.cpp's); a closing chunk with only a finish reason is no token.
                if "text" in choice and (choice["text"] or not choice.get("finish_reason")):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise UsageError(f"{url} streamed no text for a request; is it an OpenAI-compatible completions server?")
    return {"ttft": stamps[0] - start, "gaps": list(np.diff(stamps)), "tokens": len(stamps)}


def _cpu_times() -> tuple[int, int] | None:
    """(busy, idle) time summed over this machine's CPUs, in clock ticks, from /proc/stat; None where it has none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        user, nice, system, idle, iowait, irq, softirq = fields
    except (OSError, ValueError):
        return None
    return user + nice + system + irq + softirq, idle + iowait


def wait_quiet(limit: float = 5.0, window: float = 0.1, busy_below: float = 0.2, times=_cpu_times,
               sleep=time.sleep) -> float:
    """Wait until the CPUs have been idle (under busy_below of their time) for two windows in a row, at most `limit`
    seconds; returns the seconds waited. Called before every measured level: vLLM's CPU server keeps a core busy for
    about a second after its last request (measured on the 2-core machine; ours goes idle at once), and with the
    order alternating, whoever runs next was charged for it (ours, at every level). Without /proc/stat: a flat
    second."""
    before = times()
    if before is None:
        sleep(1.0)
        return 1.0
    quiet = 0
    for n in range(1, round(limit / window) + 1):
        sleep(window)
        now = times()
        busy, idle = now[0] - before[0], now[1] - before[1]
        quiet = quiet + 1 if busy < busy_below * max(busy + idle, 1) else 0
        if quiet == 2:
            return round(n * window, 2)
        before = now
    return limit


def run_server_level(url: str, model: str, prompts: list[list[int]], new_tokens: int, concurrency: int,
                     api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def go():
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency + 2)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            async def guarded(p):
                async with gate:
                    return await _one(client, url, model, p, new_tokens, headers)

            start = time.perf_counter()
            records = await asyncio.gather(*(guarded(p) for p in prompts))
            return time.perf_counter() - start, records

    wall, records = asyncio.run(go())
    return _summary("server", concurrency, wall, records)


def run_baseline_level(model, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    """Concurrent threads each calling Model.generate (streamed, to time the first token) on one shared model."""
    from neodeploy.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, stop=())
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    records: list[dict] = []

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop()
            start = time.perf_counter()
            stamps = []
            stream = model.stream(prompt, params)
            for _ in stream.deltas():
                stamps.append(time.perf_counter())
            with lock:
                records.append({"ttft": stamps[0] - start, "gaps": list(np.diff(stamps)), "tokens": len(stamps)})

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary("baseline", concurrency, time.perf_counter() - start, records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(artifact: Path, max_running: int, max_waiting: int, echo) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "neodeploy", "serve", str(artifact), "--port", str(port),
                             "--max-running", str(max_running), "--max-waiting", str(max_waiting),
                             "--model-name", "bench"], stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "NEODEPLOY_API_KEY"})
    return proc, _wait_ready(proc, f"http://127.0.0.1:{port}", "the server", echo)


def _wait_ready(proc: subprocess.Popen, url: str, what: str, echo, log: Path | None = None) -> str:
    """url once its /health answers 200; a process that exits first is one line with the last line it wrote."""
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = log.read_text(errors="replace") if log is not None else (proc.stderr.read() or "")
            raise UsageError(f"{what} exited ({proc.returncode}): {said.strip().splitlines()[-1:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                echo(f"{what} ready at {url}")
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise UsageError(f"{what} did not become ready within 600 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


PEERS = ("vllm",)
# vLLM's CPU build is set up once by the repository's peer script (a 3.5 GB environment, never a dependency).
VLLM_PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "vllm-cpu-peer.sh"


def vllm_peer(artifact: Path) -> tuple[list[str] | None, str]:
    """(the command that serves the artifact's checkpoint with vLLM on port {port}, or None, and why not)."""
    from neodeploy.core.manifest import read_manifest

    script = Path(os.environ.get("NEODEPLOY_VLLM_PEER", VLLM_PEER_SCRIPT))
    cache = Path(os.environ.get("NEODEPLOY_CACHE", Path.home() / ".cache" / "neodeploy"))
    if not script.is_file() or not (cache / "vllm-cpu-peer" / "venv" / "bin" / "python").is_file():
        return None, (f"its peer is not set up: run `bash {script} setup` once (or point NEODEPLOY_VLLM_PEER at "
                      "vllm-cpu-peer.sh)")
    manifest = read_manifest(artifact)
    if manifest.spec.family != "gpt_neox":
        return None, "vLLM has no GPT-Neo"
    source = json.loads((artifact / "neodeploy.json").read_text()).get("source") or {}
    checkpoint = Path(source.get("checkpoint", "")) if isinstance(source, dict) else Path()
    if not (checkpoint / "config.json").is_file():
        return None, f"the artifact's checkpoint ({checkpoint}) is not on this machine"
    try:
        tokenizer_class = json.loads((checkpoint / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        tokenizer_class = None
    if not tokenizer_class:
        return None, (f"vLLM loads the tokenizer with transformers: {checkpoint}/tokenizer_config.json needs a "
                      "tokenizer_class (e.g. GPTNeoXTokenizer)")
    return ["bash", str(script), "serve", str(checkpoint), "{port}"], ""


def _start_vllm(command: list[str], max_running: int, echo) -> tuple[subprocess.Popen, str, str]:
    import tempfile

    port = _free_port()
    argv = [part.replace("{port}", str(port)) for part in command] + ["--max-num-seqs", str(max_running)]
    # Its log goes to a file: vLLM writes a lot, and a pipe nobody reads would stall it.
    log = Path(tempfile.mkstemp(prefix="neodeploy-vllm-", suffix=".log")[1])
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, text=True)
    echo(f"vLLM starting (log: {log})")
    url = _wait_ready(proc, f"http://127.0.0.1:{port}", "vLLM", echo, log)
    return proc, url, _served_model(url, None)


PROMPT_VOCAB = 50000  # prompt ids are drawn from [1, 50000) whatever serves them: every system gets the same requests
WORKLOADS = ("random", "shared-prefix")


def request_set(workload: str, requests: int, prompt_len: int, prefix_len: int, vocab: int, eos: int | None,
                seed: int = 0) -> list:
    """The fixed prompts (token ids, seed 0): "random" draws each whole; "shared-prefix" gives every request one
    common prefix of prefix_len tokens (a system prompt, few-shot examples) before its own prompt_len tokens."""
    if workload not in WORKLOADS:
        raise UsageError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    rng = np.random.default_rng(seed)
    high = min(vocab, PROMPT_VOCAB)

    def draw(n):
        return [int(i) if i != eos else 1 for i in rng.integers(1, high, n)]

    prefix = draw(prefix_len) if workload == "shared-prefix" else []
    return [prefix + draw(prompt_len) for _ in range(requests)]


def warmup_set(prompts: list, workload: str, count: int, prompt_len: int, prefix_len: int, vocab: int,
               eos: int | None) -> list:
    """Requests that warm a system up without being measured: as many as the most concurrent level, so each system
    has served that many at once (its per-request buffers allocated, as in a server that has been up a while), none
    of them in the measured set; with a shared prefix, the measured set's own (a system prompt served before)."""
    warm = request_set(workload, count, prompt_len, prefix_len, vocab, eos, seed=1)
    return [prompts[0][:prefix_len] + p[prefix_len:] for p in warm] if workload == "shared-prefix" else warm


def bench_serve(artifact: str | Path | None, url: str | None = None, model_name: str | None = None,
                api_key: str | None = None, concurrency: list[int] = (1, 4, 8, 16), requests: int = 64,
                prompt_len: int = 128, new_tokens: int = 64, baseline: bool = True, max_running: int | None = None,
                echo=print, workload: str = "random", prefix_len: int = 512, compare: tuple[str, ...] = ()) -> dict:
    from neodeploy.runtime import load

    if not artifact and not url:
        raise UsageError("give an ARTIFACT (its server is started here) or --url of a running server")
    if any(c < 1 for c in concurrency) or requests < 1 or prompt_len < 1 or new_tokens < 1 or prefix_len < 0:
        raise UsageError("concurrency, requests, prompt and new tokens must be positive")
    model = load(artifact) if artifact else None
    total = prompt_len + (prefix_len if workload == "shared-prefix" else 0)
    if model and total + new_tokens > model.max_context:
        raise UsageError(f"prompt {total} + new tokens {new_tokens} exceed the artifact's context {model.max_context}")
    vocab, eos = (model.vocab_size, model.eos_token_id) if model else (PROMPT_VOCAB, None)
    prompts = request_set(workload, requests, prompt_len, prefix_len, vocab, eos)
    warmup = warmup_set(prompts, workload, max(concurrency), prompt_len, prefix_len, vocab, eos)
    unknown = [p for p in compare if p not in PEERS]
    if unknown or (compare and not artifact):
        raise UsageError(f"--compare takes {', '.join(PEERS)} with an ARTIFACT (its checkpoint is what the peer serves)"
                         + (f", not {unknown[0]!r}" if unknown else ""))
    skipped, vllm_command = {}, None
    if "vllm" in compare:
        vllm_command, why = vllm_peer(Path(artifact))
        if vllm_command is None:
            skipped["vllm"] = why
            echo(f"vllm: skipped, {why}")
    processes, slots = [], max_running or max(concurrency)
    rows = []
    try:
        if url is None:
            proc, url = _start_server(Path(artifact), slots, requests, echo)
            processes.append(proc)
            model_name = "bench"
        else:
            model_name = model_name or _served_model(url, api_key)
        systems = [("server", url, model_name, api_key)]
        if vllm_command is not None:
            proc, peer_url, peer_model = _start_vllm(vllm_command, slots, echo)
            processes.append(proc)
            systems.append(("vllm", peer_url, peer_model, None))
        for _, system_url, system_model, key in systems:
            run_server_level(system_url, system_model, warmup, 4, len(warmup), key)
        for level, c in enumerate(concurrency):
            order = systems if level % 2 == 0 else systems[::-1]  # alternate who goes first
            for name, system_url, system_model, key in order:
                settled = wait_quiet()
                rows.append({**run_server_level(system_url, system_model, prompts, new_tokens, c, key), "system": name,
                             "settled_s": settled})
                echo(_line(rows[-1]))
            if baseline and model is not None:
                settled = wait_quiet()
                rows.append({**run_baseline_level(model, prompts, new_tokens, c), "settled_s": settled})
                echo(_line(rows[-1]))
    finally:
        for proc in processes:
            _stop(proc)
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {"artifact": str(artifact) if artifact else None, "url": url, "requests": requests, "workload": workload,
              "prompt": total, "new_tokens": new_tokens, "load_average": load_avg, "rows": rows, "skipped": skipped}
    for c in concurrency:
        server = next((r for r in rows if r["system"] == "server" and r["concurrency"] == c), None)
        base = next((r for r in rows if r["system"] == "baseline" and r["concurrency"] == c), None)
        if server and base:
            server["speedup_vs_baseline"] = round(server["tokens_per_s"] / base["tokens_per_s"], 2)
    return report


def _line(r: dict) -> str:
    return (f"{r['system']:<9} c={r['concurrency']:<3} {r['tokens_per_s']:>8.1f} tok/s  TTFT p50/p99 "
            f"{r['ttft_p50_ms']:>8.1f} / {r['ttft_p99_ms']:>8.1f} ms  ITL p50/p99 {r['itl_p50_ms']:>7.2f} / "
            f"{r['itl_p99_ms']:>7.2f} ms  ({r['requests']} requests, {r['seconds']} s)")


def throughput_table(report: dict) -> str:
    lines = ["| system | concurrency | tokens/s | × baseline | TTFT p50 / p99 ms | ITL p50 / p99 ms |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                     f"{r.get('speedup_vs_baseline', '')}{'×' if 'speedup_vs_baseline' in r else ''} | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system in ("server", "vllm", "baseline"):
        rows = [r for r in report["rows"] if r["system"] == system]
        if rows:
            xs = [r["concurrency"] for r in rows]
            axes[0].plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=system)
            axes[1].plot(xs, [r["ttft_p99_ms"] / 1e3 for r in rows], marker="o", label=system)
    axes[0].set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="TTFT p99 (s)", title="time to first token")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['artifact'] or report['url']}: {report['requests']} requests, prompt {report['prompt']}, "
                 f"{report['new_tokens']} new tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _served_model(url: str, api_key: str | None) -> str:
    """The id the server at url serves; a server that is not there, or refuses us, is one line saying what to do."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10)
    except httpx.TransportError as exc:
        raise UsageError(f"cannot reach {url} ({type(exc).__name__}: {str(exc) or 'no answer'}); start the server "
                         "or fix --url") from exc
    if response.status_code == 401:
        raise UsageError(f"{url} wants an API key: pass --api-key")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UsageError(f"{url}/v1/models answered {response.status_code} without a model list; is --url an "
                         "OpenAI-compatible server?") from exc
