"""The prefix cache is exact: a request's output is the same with the cache on or off, equal to Model.generate
alone, on both families and both graph kinds (GPT-Neo's local window of 4 crossing the reuse boundary; the CPU
target's rotary inside the kernel), with reused rows joining a running, left-padded batch; and it is reported
as OpenAI reports it."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import call_log, tiny_neo, tiny_neox
from neodeploy.core.errors import UsageError
from neodeploy.runtime import load
from neodeploy.runtime.engine import Engine, EngineConfig, parse_prefix_cache
from neodeploy.runtime.prefix import BLOCK, PrefixCache
from neodeploy.runtime.sampling import SamplingParams


@pytest.fixture(scope="module", params=[("gpt_neox", "portable"), ("gpt_neox", "cpu"), ("gpt_neo", "portable"),
                                        ("gpt_neo", "cpu")], ids=lambda p: "-".join(p))
def model(request, exported):
    family, target = request.param
    spec = tiny_neox() if family == "gpt_neox" else tiny_neo()
    return load(exported(f"prefix-{family}", spec, target=target)[1])


def _prompts(seed=0):
    """Prompts sharing a 40-token system prefix (two whole blocks and a half), one sharing only its first block,
    one that is exactly two blocks long (reuse stops a token short of the end), and strangers."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 300) for _ in range(40)]
    shared = [system + [rng.randrange(1, 300) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    return ([system + [7, 8, 9]] + shared + [system[:BLOCK] + [5] * 12, system[:2 * BLOCK]]
            + [[rng.randrange(1, 300) for _ in range(rng.randint(3, 30))] for _ in range(3)])


def _params(i):
    return SamplingParams(max_new_tokens=6 + i % 5, temperature=0.0 if i % 2 else 0.8, seed=i)


def _run(model, prompts, prefix_cache):
    engine = Engine(model, EngineConfig(max_running=3, prefill_chunk=24, prefix_cache=prefix_cache))
    try:
        first = engine.submit(prompts[0], _params(0))  # fills the cache
        results = [first.result(60)]
        handles = [engine.submit(p, _params(i)) for i, p in enumerate(prompts[1:], 1)]  # join a running batch
        results += [h.result(60) for h in handles]
        return results, [first.cached_tokens] + [h.cached_tokens for h in handles], engine.prefix
    finally:
        engine.close()


def _quantized(tmp_path, method):
    """A tiny GPT-NeoX exported for the CPU target with `--quantize method`: the artifact's folder."""
    from neodeploy.export import export
    from neodeploy.reference import make_checkpoint

    checkpoint = make_checkpoint(tiny_neox(), tmp_path / "ckpt", seed=5, init_std=0.1)
    return export(checkpoint, tmp_path / method, quantize=method, target="cpu", echo=lambda s: None)


def test_outputs_are_identical_with_the_cache_on_or_off_and_equal_alone(model):
    prompts = _prompts()
    on, cached, cache = _run(model, prompts, "64MiB")
    off, none, _ = _run(model, prompts, 0)
    for i, (prompt, a, b) in enumerate(zip(prompts, on, off)):
        alone = model.generate(prompt, _params(i))[0]
        assert a.output_ids == b.output_ids == alone.output_ids, i
        assert a.finish_reason == b.finish_reason == alone.finish_reason
    assert cached[0] == 0 and none == [0] * len(prompts)
    assert all(c == 2 * BLOCK for c in cached[1:7])  # the shared system prompt, reused
    assert cached[7] == BLOCK and cached[8] == BLOCK  # one block shared; exactly two blocks long: one reused
    assert cache.hit_tokens == sum(cached) and cache.query_tokens == sum(len(p) for p in prompts)


def lookup(cache, prompt):
    """(tokens reused, past arrays [1, heads, tokens, head_dim]), checking that the hit written straight into a
    cache's row holds the same."""
    hit = cache.lookup(prompt)
    arrays = hit.arrays()
    cache_rows = [np.zeros((2, a.shape[1], hit.tokens + 5, a.shape[3]), a.dtype) for a in arrays]
    hit.write_into([c[1:] for c in cache_rows])
    for a, c in zip(arrays, cache_rows):
        assert np.array_equal(c[1, :, : hit.tokens], a[0]) and not c[0].any() and not c[1, :, hit.tokens:].any()
    return hit.tokens, arrays


@pytest.mark.parametrize("layout", [None, (4, 2, 4)], ids=["pool-from-first-store", "pool-warmed-up-front"])
def test_the_cache_keeps_to_its_budget_and_evicts_the_least_recently_used(layout):
    layers, heads, dim = 2, 2, 4
    block_bytes = 2 * layers * heads * BLOCK * dim * 4
    cache = PrefixCache(3 * block_bytes, layout=layout)
    cache.warm()

    def arrays(n, base):  # past input i of prompt `base`, token t: base + 10 i + t
        t = np.arange(n, dtype=np.float32)[None, None, :, None]
        return [np.broadcast_to(base + 10 * i + t, (1, heads, n, dim)).copy() for i in range(2 * layers)]

    a, b = list(range(48)), [1000 + t for t in range(48)]
    cache.store(a, arrays(48, 100))  # three blocks: full
    assert cache.bytes == 3 * block_bytes
    reused, kv = lookup(cache, a + [1])
    assert reused == 3 * BLOCK and all(np.array_equal(got, want) for got, want in zip(kv, arrays(48, 100)))
    cache.store(b[:16], arrays(16, 500))  # evicts a's last block into its slot: a chain goes leaf first, root last
    assert cache.bytes == 3 * block_bytes
    reused, kv = lookup(cache, a + [1])
    assert reused == 2 * BLOCK  # its first two blocks still lead somewhere, with their own keys and values
    assert all(np.array_equal(got, want[:, :, :2 * BLOCK]) for got, want in zip(kv, arrays(48, 100)))
    reused, kv = lookup(cache, b[:16] + [2])
    assert reused == BLOCK and kv[3].shape == (1, heads, BLOCK, dim)
    assert all(np.array_equal(got, want) for got, want in zip(kv, arrays(16, 500)))  # the reused slot: b's now
    assert parse_prefix_cache("auto") <= 1 << 30 and parse_prefix_cache("512MiB") == 512 << 20
    assert parse_prefix_cache("auto", running_bytes=5 << 20) == 5 << 20  # no more than the running slots' cache
    assert parse_prefix_cache(None) == 0


def test_a_hit_spread_over_scattered_slots_reads_back_exactly():
    """A prompt's blocks fill consecutive free slots; one grown later takes whatever slot is free next: its hit is
    copied stretch by stretch, each block to its own place."""
    layers, heads, dim = 2, 2, 4
    cache = PrefixCache(8 * 2 * layers * heads * BLOCK * dim * 4, layout=(2 * layers, heads, dim))

    def arrays(n, base):  # past input i, token t: base + 10 i + t
        t = np.arange(n, dtype=np.float32)[None, None, :, None]
        return [np.broadcast_to(base + 10 * i + t, (1, heads, n, dim)).copy() for i in range(2 * layers)]

    a, other = list(range(64)), [500 + t for t in range(16)]
    cache.store(a[:32], arrays(32, 100))  # slots 0, 1
    cache.store(other, arrays(16, 900))  # slot 2
    cache.store(a, arrays(64, 100))  # its first two blocks are cached; the next two take slots 3, 4
    cache.store(other + [1] * 16, arrays(32, 900))  # slot 5
    reused, kv = lookup(cache, a + [1])
    assert reused == 64 and all(np.array_equal(got, want) for got, want in zip(kv, arrays(64, 100)))
    reused, kv = lookup(cache, other + [1] * 17)
    assert reused == 32 and all(np.array_equal(got, want) for got, want in zip(kv, arrays(32, 900)))


def test_a_budget_below_one_block_is_refused_unless_auto_chose_it(exported):
    model = load(exported("prefix-gpt_neox", tiny_neox(), target="cpu")[1])
    # one block: 2 layers x (keys, values) x 4 heads x 16 tokens x 16 dims x 4 bytes = 16 KiB
    with pytest.raises(UsageError, match=r"'16383' holds no 16-token block of this model .* give at least 16KiB, or 0"):
        Engine(model, EngineConfig(prefix_cache="16383"))
    engine = Engine(model, EngineConfig(prefix_cache="16KiB"))
    engine.close()
    assert engine.prefix.slots == 1
    # "auto" sizes the cache by the running slots' KV: below one block (a tiny kv budget) it is simply off
    engine = Engine(model, EngineConfig(max_running=1, kv_budget=12))
    try:
        assert engine.prefix is None
        assert engine.generate([1, 2, 3], SamplingParams(max_new_tokens=4)).finish_reason == "length"
    finally:
        engine.close()


def test_an_int4_artifact_keeps_the_prefix_cache_off_and_the_gate_runs_its_prompts_alone(tmp_path):
    """int4's MatMulNBits rounds each activation row to int8 per block, but the floats it rounds differ in their last
    bits with the call's shape, and a rounding step magnifies that: pythia-160m int4 failed the serve gate batched
    (--max-running 4). As for int8: the prefix cache (whose keys come from another call) is off unless a size is
    given, and the gate runs the golden prompts through the engine one at a time."""
    from neodeploy.runtime.check import run_engine_check

    model = load(_quantized(tmp_path, "int4"))
    for config, on in ((EngineConfig(), False), (EngineConfig(prefix_cache="1MiB"), True)):
        engine = Engine(model, config)
        engine.close()
        assert (engine.prefix is not None) == on
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        with call_log(model.backend, "prefill", "decode") as log:
            assert run_engine_check(model, engine) == []
    finally:
        engine.close()
    assert len(log) > 20 and {shape[0] for _, shape in log} == {1}  # batched, the engine's calls hold several rows


def test_cached_tokens_in_usage_and_metrics(exported):
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    _, art = exported("prefix-gpt_neox", tiny_neox(), target="cpu")
    options = ServeOptions(art, "tiny", skip_check=True)
    state = ServerState(options)
    state.load()
    prompt = list(range(1, 41))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(options, state)),
                                     base_url="http://test") as c:
            out = []
            for ids in (prompt + [50], prompt + [60, 61]):
                r = await c.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 3,
                                                           "temperature": 0})
                out.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            return out, (await c.get("/metrics")).text

    try:
        cached, metrics = asyncio.run(go())
    finally:
        state.engine.close()
    assert cached == [0, 2 * BLOCK]
    assert f"neodeploy_prefix_cache_hit_tokens_total {2 * BLOCK}.0" in metrics
    assert "neodeploy_prefix_cache_query_tokens_total 83.0" in metrics
    assert "neodeploy_prefix_cache_bytes " in metrics and "neodeploy_prefix_cache_bytes 0.0" not in metrics


def test_bench_serve_request_sets_are_the_same_for_every_system():
    """Prompt ids come from one range whatever serves them (an artifact's 50304-row vocabulary drew from all of it,
    --url from 50000: two systems measured on different requests); shared-prefix requests share their prefix."""
    from neodeploy.serve.throughput import request_set, warmup_set

    ours = request_set("random", 8, 128, 0, 50304, 0)
    theirs = request_set("random", 8, 128, 0, 50000, None)
    assert ours == theirs and max(max(p) for p in ours) < 50000 and 0 not in {t for p in ours for t in p}
    shared = request_set("shared-prefix", 4, 16, 512, 50304, 0)
    assert all(len(p) == 528 and p[:512] == shared[0][:512] for p in shared) and len({tuple(p[512:]) for p in shared}) == 4
    # The warm-up: as many requests as the busiest level, none of them measured; a shared prefix is the measured one.
    warm = warmup_set(ours, "random", 8, 128, 0, 50304, 0)
    assert len(warm) == 8 and all(len(p) == 128 for p in warm) and not {tuple(p) for p in warm} & {tuple(p) for p in ours}
    warm = warmup_set(shared, "shared-prefix", 4, 16, 512, 50304, 0)
    assert all(len(p) == 528 and p[:512] == shared[0][:512] for p in warm)
    assert not {tuple(p[512:]) for p in warm} & {tuple(p[512:]) for p in shared}


def test_bench_serve_waits_for_two_quiet_windows_before_a_level_and_gives_up_at_its_limit():
    """The busy / idle ticks are scripted: busy windows reset the count, two quiet ones in a row end the wait, and a
    machine that never goes quiet is waited on for the limit only."""
    from neodeploy.serve.throughput import wait_quiet

    def scripted(windows):  # each window: (busy, idle) ticks spent in it
        totals = [(0, 0)]
        for busy, idle in windows:
            totals.append((totals[-1][0] + busy, totals[-1][1] + idle))
        return iter(totals).__next__

    naps = []
    waited = wait_quiet(times=scripted([(10, 0), (1, 9), (8, 2), (1, 9), (0, 10), (10, 0)]), sleep=naps.append)
    assert waited == pytest.approx(0.5) and len(naps) == 5  # quiet at windows 4 and 5, not at 2 alone
    ticks = [0]

    def always_busy():
        ticks[0] += 10
        return ticks[0], 0

    assert wait_quiet(limit=1.0, times=always_busy, sleep=lambda s: None) == pytest.approx(1.0)
    assert wait_quiet(times=lambda: None, sleep=naps.append) == 1.0 and naps[-1] == 1.0  # no /proc/stat: a flat second


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat")
def test_bench_serve_outlasts_a_process_that_keeps_the_cpu_busy():
    """As vLLM's server does for about a second after its last request: the next level starts after it stops."""
    import subprocess
    import sys

    from neodeploy.serve.throughput import wait_quiet

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.1)
        wait_quiet(limit=10.0)
        assert spinner.poll() is not None, "the wait ended while the spinner still kept a CPU busy"
    finally:
        spinner.kill()
        spinner.wait()



def test_bench_serve_compares_with_vllm_only_where_its_peer_can_serve_and_says_why_not(exported, tmp_path, monkeypatch):
    """--compare vllm: skipped with the reason (the peer is not set up; GPT-Neo; a checkpoint without the
    tokenizer_class vLLM's transformers tokenizer needs), and the command is the peer script's serve otherwise."""
    from neodeploy.serve.throughput import bench_serve, vllm_peer

    neox = exported("prefix-gpt_neox", tiny_neox())[1]
    monkeypatch.setenv("NEODEPLOY_VLLM_PEER", str(tmp_path / "missing.sh"))
    command, why = vllm_peer(neox)
    assert command is None and "not set up" in why and "setup" in why
    script, cache = tmp_path / "vllm-cpu-peer.sh", tmp_path / "cache"
    script.write_text("exit 2\n")
    (cache / "vllm-cpu-peer" / "venv" / "bin").mkdir(parents=True)
    (cache / "vllm-cpu-peer" / "venv" / "bin" / "python").write_text("")
    monkeypatch.setenv("NEODEPLOY_VLLM_PEER", str(script))
    monkeypatch.setenv("NEODEPLOY_CACHE", str(cache))
    assert "no GPT-Neo" in vllm_peer(exported("prefix-gpt_neo", tiny_neo())[1])[1]
    command, why = vllm_peer(neox)  # the byte tokenizer's config names its class
    checkpoint = exported("prefix-gpt_neox", tiny_neox())[0]
    assert command == ["bash", str(script), "serve", str(checkpoint.resolve()), "{port}"] and why == ""
    config = (checkpoint / "tokenizer_config.json").read_text()
    (checkpoint / "tokenizer_config.json").write_text("{}")
    try:
        command, why = vllm_peer(neox)
    finally:
        (checkpoint / "tokenizer_config.json").write_text(config)
    assert command is None and "tokenizer_class" in why
    with pytest.raises(UsageError, match="--compare takes vllm"):
        bench_serve(None, url="http://127.0.0.1:1", compare=("vllm",))


def test_the_serve_gate_runs_the_golden_prompts_through_the_engine_and_refuses_a_drift(exported, monkeypatch):
    from neodeploy.runtime import prefix
    from neodeploy.runtime.check import run_engine_check

    model = load(exported("prefix-gpt_neo", tiny_neo(), target="cpu")[1])
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        assert run_engine_check(model, engine) == []
        assert engine.prefix.hit_tokens > 0  # the gate did go through the cache
    finally:
        engine.close()
    write_into, arrays = prefix.Hit.write_into, prefix.Hit.arrays

    def drifted_into(self, views):  # a cache that hands back keys and values that are slightly off
        write_into(self, views)
        for view in views:
            view[:, :, : self.tokens] *= 1.5

    monkeypatch.setattr(prefix.Hit, "write_into", drifted_into)
    monkeypatch.setattr(prefix.Hit, "arrays", lambda self: [a * 1.5 for a in arrays(self)])
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        failures = run_engine_check(model, engine)
    finally:
        engine.close()
    assert failures and "differs from plain decoding" in failures[0]


def test_an_int8_artifact_passes_the_serve_gate_with_its_prompts_alone(tmp_path):
    """int8 quantises activations with one scale per call, so batched its tokens may differ from plain decoding
    (a documented property, not a drift: this tiny model's did, before the gate knew). The gate then runs each
    golden prompt alone through the engine, and `serve` starts."""
    from neodeploy.serve.app import ServeOptions, ServerState

    state = ServerState(ServeOptions(_quantized(tmp_path, "int8"), "tiny-int8", engine=EngineConfig(max_running=4)))
    state.load()
    try:
        assert (state.status, state.error) == ("ready", None)
        assert state.check["passed"] and state.check["engine_seconds"] > 0
        assert state.engine.prefix is None  # one activation scale per call: reuse would not be exact
    finally:
        state.engine.close()


def test_requests_sharing_a_cached_prefix_run_their_own_tokens_in_one_call(model):
    """Three requests queued together behind a cached system prompt, each with 5 tokens of its own: the cache's
    rows are stacked and their own tokens run in one [3, 5] call (where the graph's attention takes several rows
    over a past); each still yields what it yields alone."""
    rng = random.Random(11)
    system = [rng.randrange(1, 300) for _ in range(2 * BLOCK)]
    prompts = [system + [rng.randrange(1, 300) for _ in range(5)] for _ in range(3)]
    engine = Engine(model, EngineConfig(max_running=4, prefix_cache="16MiB"))
    joined = []  # rows in the running batch at each call

    try:
        engine.generate(system + [1], _params(1))  # caches the system prompt's two blocks
        with call_log(model.backend, "decode", hook=lambda *_: joined.append(engine._batch.rows)) as log:
            with engine._lock:  # the loop waits on this lock: all three are queued when it next looks
                handles = [engine.submit(p, _params(i)) for i, p in enumerate(prompts)]
            results = [h.result(60) for h in handles]
    finally:
        engine.close()
    shapes = [shape for _, shape in log]
    # GroupQueryAttention (the CPU target's) takes several tokens over a past for one row only: one row at a time,
    # and none joins the batch (a copy of its row) before the last has run: nobody's first token waits for a copy
    assert shapes[:3] == ([(3, 5), (3, 1), (3, 1)] if model.backend.extends_rows else [(1, 5)] * 3)
    assert joined[:4] == ([0, 3, 3, 3] if model.backend.extends_rows else [0, 0, 0, 3])
    assert model.backend.extends_rows == (model.manifest.onnx.target == "portable")
    assert [h.cached_tokens for h in handles] == [2 * BLOCK] * 3
    for i, (prompt, got) in enumerate(zip(prompts, results)):
        assert got.output_ids == model.generate(prompt, _params(i))[0].output_ids


def test_a_failing_stacked_call_falls_back_to_one_request_at_a_time(model):
    """Where the stacked call of cached rows fails (here: injected), each request is tried alone from the cache:
    nobody fails for a neighbour, and each still yields what it yields alone."""
    if not model.backend.extends_rows:
        pytest.skip("the CPU target's attention runs cached rows one at a time: no stacked call to fail")
    rng = random.Random(12)
    system = [rng.randrange(1, 300) for _ in range(2 * BLOCK)]
    prompts = [system + [rng.randrange(1, 300) for _ in range(4)] for _ in range(3)]
    engine = Engine(model, EngineConfig(max_running=4, prefix_cache="16MiB"))
    decode, refused = model.backend.decode, []

    def refuses_stacks(ids, *args, **kwargs):
        if ids.shape[0] > 1 and ids.shape[1] > 1:
            refused.append(ids.shape)
            raise RuntimeError("injected fault")
        return decode(ids, *args, **kwargs)

    try:
        engine.generate(system + [1], _params(1))
        model.backend.decode = refuses_stacks
        with engine._lock:
            handles = [engine.submit(p, _params(i)) for i, p in enumerate(prompts)]
        results = [h.result(60) for h in handles]
    finally:
        model.backend.__dict__.pop("decode", None)
        engine.close()
    assert refused == [(3, 4)]
    assert [h.cached_tokens for h in handles] == [2 * BLOCK] * 3
    for i, (prompt, got) in enumerate(zip(prompts, results)):
        assert got.output_ids == model.generate(prompt, _params(i))[0].output_ids
