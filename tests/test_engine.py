"""The continuous-batching engine: every request yields what Model.generate yields for it alone."""

from __future__ import annotations

import contextlib
import random
import threading
import time

import numpy as np
import pytest

from conftest import call_log, calls_of, tiny_neo, tiny_neox
from neodeploy.core.errors import OverloadedError, UsageError
from neodeploy.runtime import load
from neodeploy.runtime.backend import SpareMemory
from neodeploy.runtime.batch import DecodeBatch, RotaryTable
from neodeploy.runtime.engine import Engine, EngineConfig, parse_kv_budget
from neodeploy.runtime.sampling import SamplingParams

# Portable graphs of both families, and CPU-target graphs (in-place cache pool) for GPT-Neo and for GPT-NeoX with
# rotary inside the kernel (head_dim 64: keys are rotated at their cache index and re-rotated when rows move).
# The cpu-* names are the ones test_cpu_target exports, so the session exports each once.
ARTIFACTS = {
    "portable-neo": ("rt-gpt_neo", tiny_neo, "portable"),
    "portable-neox": ("rt-gpt_neox", tiny_neox, "portable"),
    "cpu-neo": ("cpu-neo", tiny_neo, "cpu"),
    "cpu-neox-rotary-in-kernel": ("cpu-neox-rotary-in-kernel", lambda: tiny_neox(hidden_size=128, num_heads=2), "cpu"),
}


@pytest.fixture(scope="module", params=list(ARTIFACTS))
def model(request, exported):
    name, spec, target = ARTIFACTS[request.param]
    return load(exported(name, spec(), target=target)[1])


def _requests(count, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(1, 300) for _ in range(rng.randint(1, 40))], rng.randint(1, 20)) for _ in range(count)]


def test_24_staggered_greedy_requests_equal_each_alone(model):
    """Prompts of 1..40 tokens, budgets 1..20, five slots, prefill chunks of 16: rows join mid-decode, wait for a
    slot, leave at different steps, and long prompts are prefilled over several step boundaries."""
    requests = _requests(24)
    engine = Engine(model, EngineConfig(max_running=5, prefill_chunk=16))
    handles = []

    def submit_all():
        rng = random.Random(1)
        for prompt, n in requests:
            handles.append(engine.submit(prompt, max_new_tokens=n))
            time.sleep(rng.random() * 0.004)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    submitter.join(60)
    try:
        results = [h.result(timeout=120) for h in handles]
    finally:
        engine.close()
    assert len(results) == 24
    for (prompt, n), got in zip(requests, results):
        want = model.generate(prompt, max_new_tokens=n)[0]
        assert (got.output_ids, got.finish_reason, got.text) == (want.output_ids, want.finish_reason, want.text)
        assert got.prompt_ids == prompt
    assert engine.running == 0 and engine.waiting == 0


def test_requests_that_arrive_together_are_prefilled_in_one_call_exactly(model):
    """Four requests queued before the loop looks are prefilled left-padded in one call and join the batch
    together; each yields what it yields alone (greedy and seeded sampling; one ends at its first token). The
    prefix cache keeps a padded row's prompt as an unpadded prefill computes it (the CPU target's keys re-rotated
    from their padded index): a later request that extends it reuses two blocks and still matches alone."""
    from neodeploy.runtime.prefix import BLOCK

    rng = random.Random(5)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (40, 2 * BLOCK + 3, 20, 5)]
    params = [SamplingParams(max_new_tokens=n, temperature=t, seed=i)
              for i, (n, t) in enumerate([(7, 0.0), (9, 0.0), (1, 0.0), (8, 0.9)])]
    engine = Engine(model, EngineConfig(max_running=4, prefix_cache="16MiB"))
    with calls_of(model.backend, "prefill") as shapes, contextlib.closing(engine):
        with engine._lock:  # the loop waits on this lock: all four are queued when it next looks
            handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
        results = [h.result(timeout=60) for h in handles]
        assert shapes[0] == (4, 40)
        extended = prompts[1] + [3, 1, 4]
        later = engine.submit(extended, params[1])
        assert later.result(timeout=60).output_ids == model.generate(extended, params[1])[0].output_ids
        assert later.cached_tokens == 2 * BLOCK
    for prompt, q, got in zip(prompts, params, results):
        want = model.generate(prompt, q)[0]
        assert (got.output_ids, got.finish_reason) == (want.output_ids, want.finish_reason)
    assert len(results[2].output_ids) == 1


def test_a_pool_drops_padding_columns_lazily_and_stays_exact(model, monkeypatch):
    """Rows leaving a pool leave their padding columns behind while they are few (moving every row costs a step),
    and the rows move left once those columns are over half the width or the pool runs out of width. Four requests
    prefilled together in a 48-token pool: the long prompt that ends first leaves most of the width padding (the
    rows move left); the others leave a little (it stays); each request yields what it yields alone."""
    from neodeploy.runtime.batch import DecodeBatch

    moves, kept, shift, keep = [], [], DecodeBatch._shift, DecodeBatch.keep

    def shifted(self, pool, n, width, by):
        moves.append(by)
        shift(self, pool, n, width, by)

    def counted(self, rows):
        keep(self, rows)
        if self.rows:
            kept.append(self.width - int(self.lengths.max()))

    monkeypatch.setattr(DecodeBatch, "_shift", shifted)
    monkeypatch.setattr(DecodeBatch, "keep", counted)
    rng = random.Random(3)
    requests = [([rng.randrange(1, 300) for _ in range(n)], new) for n, new in ((5, 30), (30, 2), (4, 12), (6, 20))]
    engine = Engine(model, EngineConfig(max_running=4, kv_budget=4 * 48))
    try:
        with engine._lock:  # the loop waits on this lock: all four are queued when it next looks
            handles = [engine.submit(prompt, max_new_tokens=n) for prompt, n in requests]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.close()
    if model.backend.in_place:  # the pool is the in-place cache's
        assert any(by < 0 for by in moves)  # the rows moved left once the long prompt left
        assert any(padding > 0 for padding in kept)  # ... and kept a few padding columns later
    for (prompt, n), got in zip(requests, results):
        assert got.output_ids == model.generate(prompt, max_new_tokens=n)[0].output_ids


def test_seeded_sampling_is_independent_of_the_batch(model):
    opts = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2)
    requests = _requests(6, seed=3)
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        handles = [engine.submit(p, seed=i, **opts) for i, (p, _) in enumerate(requests)]
        got = [h.result(timeout=60).output_ids for h in handles]
    finally:
        engine.close()
    want = [model.generate(p, seed=i, **opts)[0].output_ids for i, (p, _) in enumerate(requests)]
    assert got == want
    assert len({tuple(g) for g in got}) > 1


def test_streamed_deltas_join_to_the_text_and_logprobs_are_log_softmax(model):
    engine = Engine(model, EngineConfig(max_running=2))
    try:
        handle = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=6, logprobs=3))
        deltas = list(handle)
    finally:
        engine.close()
    result = handle.result()
    assert "".join(d.text for d in deltas) == result.text
    assert deltas[-1].finish_reason == result.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
    assert [s.token for s in result.logprobs] == result.output_ids
    for s in result.logprobs:
        assert s.top[0][0] == s.token  # greedy: the sampled token is the most likely one
        assert s.logprob <= 0 and [lp for _, lp in s.top] == sorted((lp for _, lp in s.top), reverse=True)


def test_cancel_frees_the_slot_and_the_queue_limit_raises(exported):
    model = load(exported("rt-gpt_neox", tiny_neox())[1])
    engine = Engine(model, EngineConfig(max_running=1, max_waiting=1))
    try:
        long = engine.submit([1, 2, 3], max_new_tokens=100)
        first = next(iter(long))
        assert first.token is not None
        queued = engine.submit([4, 5], max_new_tokens=3)
        with pytest.raises(OverloadedError, match="max_running \\+ max_waiting"):
            engine.submit([6], max_new_tokens=3)
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        assert len(long.result().output_ids) < 100
        assert queued.result(timeout=30).output_ids == model.generate([4, 5], max_new_tokens=3)[0].output_ids
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and engine.waiting == 0
    finally:
        engine.close()


class _Faulty:
    """The real backend, except that a prefill with a prompt whose first token is 13 fails."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prefill(self, ids, mask, pos, capacity=None):
        if (ids[np.arange(len(ids)), mask.argmax(1)] == 13).any():  # rows are left-padded
            raise RuntimeError("injected fault")
        return self._backend.prefill(ids, mask, pos, capacity)


def test_a_failing_request_leaves_the_others_running(exported):
    model = load(exported("cpu-neo", tiny_neo(), target="cpu")[1])
    want = [model.generate(p, max_new_tokens=n)[0].output_ids for p, n in _requests(4, seed=9)]
    model.backend = _Faulty(model.backend)
    engine = Engine(model, EngineConfig(max_running=3))
    try:
        good = [engine.submit(p, max_new_tokens=n) for p, n in _requests(4, seed=9)[:2]]
        bad = engine.submit([13, 1, 2], max_new_tokens=5)
        good += [engine.submit(p, max_new_tokens=n) for p, n in _requests(4, seed=9)[2:]]
        with pytest.raises(RuntimeError, match="injected fault"):
            bad.result(timeout=30)
        assert [h.result(timeout=30).output_ids for h in good] == want
    finally:
        engine.close()


def test_non_finite_logits_fail_only_their_own_request(exported, monkeypatch):
    """A row whose logits are NaN (a broken or overflowing model, here one sequence's sampler seeing NaN after
    its third token) fails that request with the typed error; the other rows of the same batch finish as alone."""
    from neodeploy.core.errors import ModelOutputError
    from neodeploy.runtime import sampling

    model = load(exported("cpu-neo", tiny_neo(), target="cpu")[1])
    want = [model.generate(p, max_new_tokens=n)[0].output_ids for p, n in _requests(3, seed=4)]
    call = sampling.Sampler.__call__

    def poisoned(self, logits, allowed=None):
        if self.params.seed == 666 and len(self.history[0]) >= 6:
            logits = np.full_like(logits, np.nan)
        return call(self, logits, allowed)

    monkeypatch.setattr(sampling.Sampler, "__call__", poisoned)
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        good = [engine.submit(p, max_new_tokens=n) for p, n in _requests(3, seed=4)]
        bad = engine.submit([5, 6, 7], SamplingParams(temperature=0.8, seed=666, max_new_tokens=12))
        with pytest.raises(ModelOutputError, match="not finite"):
            bad.result(timeout=30)
        assert [h.result(timeout=30).output_ids for h in good] == want
    finally:
        engine.close()


def test_limits_and_budgets_are_checked_at_submit(exported):
    model = load(exported("rt-gpt_neox", tiny_neox())[1])  # max_context 128
    per_token = 2 * 2 * 64 * 4
    assert parse_kv_budget("4096", model.manifest) == 4096
    assert parse_kv_budget(f"{per_token * 300}B", model.manifest) == 300
    assert parse_kv_budget("1MiB", model.manifest) == 2**20 // per_token
    for bad in ("lots", "0", "-5", "1.5", "3 parsecs"):
        with pytest.raises(UsageError):
            parse_kv_budget(bad, model.manifest)
    engine = Engine(model, EngineConfig(max_running=4, kv_budget=200))  # 50 tokens per sequence
    try:
        assert engine.capacity == 50 and engine.kv_bytes == 4 * 50 * per_token
        with pytest.raises(UsageError, match="per-sequence KV budget of 50"):
            engine.submit(list(range(1, 41)), max_new_tokens=11)
        with pytest.raises(UsageError, match="outside the vocabulary"):
            engine.submit([999], max_new_tokens=1)
        with pytest.raises(UsageError, match="temperature"):
            engine.submit([1], max_new_tokens=1, temperature=-1)
        assert engine.generate(list(range(1, 41)), max_new_tokens=10).finish_reason in ("length", "eos")
    finally:
        engine.close()
    with pytest.raises(UsageError, match="max_running"):
        EngineConfig(max_running=0)


def test_rotary_table_moves_keys_like_rotating_at_the_new_index():
    """Rotating at index p then shifting by s equals rotating at p + s (the kernel's own cos/sin recipe)."""
    table = RotaryTable(16, 10000.0)
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((1, 2, 40, 32)).astype(np.float32)

    def rotated_at(offset):
        out = raw.copy()
        cos, sin = table._cos_sin(np.arange(40) + offset)
        x1, x2 = raw[..., :8], raw[..., 8:16]
        out[..., :8], out[..., 8:16] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out

    moved = np.zeros((1, 2, 60, 32), np.float32)
    moved[:, :, 20:60] = rotated_at(0)
    table.shift(moved, 20, 60, 20)
    np.testing.assert_allclose(moved[:, :, 20:60], rotated_at(20), atol=2e-5)
    np.testing.assert_array_equal(moved[..., 16:][:, :, 20:], raw[..., 16:])  # beyond the rotary dims: untouched


def test_a_joined_request_s_cache_memory_serves_the_next_and_its_old_values_change_nothing(model):
    """Each prefill runs in a cache of its own, copied into the batch when it joins; that memory then serves the
    next request (faulting fresh pages in cost more than a cache hit's own tokens). Poisoned here with large values
    beyond what the next request writes: its logits, at prefill and at each step, equal those in fresh memory."""
    backend = model.backend
    if not backend.in_place:
        pytest.skip("only an in-place cache (CPU target) is allocated per request on the host")
    pad = model.pad_token_id
    first = DecodeBatch(backend)
    first.prefill([[5, 6, 7, 8, 9, 10]], pad, capacity=12)
    released = first.state.memory
    DecodeBatch(backend, rows=2, capacity=32).join(first)
    assert first.state is None
    released[:] = 1e4

    def run():
        batch = DecodeBatch(backend)
        logits = [batch.prefill([[11, 12, 13]], pad, capacity=12)]
        logits += [batch.step(np.array([t])) for t in (14, 15, 16)]
        return batch, logits

    recycled, got = run()
    assert np.shares_memory(recycled.state.memory, released)
    fresh, want = run()  # nothing is spare now: fresh memory
    assert not np.shares_memory(fresh.state.memory, released)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_spare_cache_memory_gives_the_smallest_that_fits_and_keeps_to_its_limit():
    spare = SpareMemory(np.float32, limit=1000 * 4)
    small, large, huge = (np.zeros(n, np.float32) for n in (300, 600, 1200))
    spare.give(large)
    spare.give(small)
    spare.give(huge)  # over the limit alone: not kept
    spare.give(np.zeros(100, np.float16))  # another dtype: not kept
    taken = spare.take(250)
    assert taken.size == 250 and np.shares_memory(taken, small)
    assert spare.take(700) is None
    spare.give(taken)  # its whole buffer comes back
    spare.give(np.zeros(500, np.float32))  # 300 + 600 + 500 > 1000: the oldest (600) goes
    assert spare.take(600) is None and spare.take(300).size == 300 and spare.take(500).size == 500


def test_rows_that_leave_are_filled_from_the_end():
    from neodeploy.runtime.engine import survivors

    assert survivors(5, {1}) == [0, 4, 2, 3]  # one row moves, not three
    assert survivors(5, {0, 4}) == [3, 1, 2]
    assert survivors(3, {0, 1, 2}) == [] and survivors(3, set()) == [0, 1, 2]


@pytest.mark.parametrize("wait", [0.5, 0.0])
def test_clients_that_come_back_together_after_their_batch_ends_start_together(exported, wait):
    """Three requests end at the same step; their clients' next requests arrive 30 ms apart. Within regroup_wait
    the engine waits for all three and prefills them in one call; with 0 it starts the first at once, alone."""
    model = load(exported("cpu-neo", tiny_neo(), target="cpu")[1])
    engine = Engine(model, EngineConfig(max_running=3, regroup_wait=wait))
    rng = random.Random(8)
    prompts = [[rng.randrange(1, 300) for _ in range(10)] for _ in range(6)]
    with calls_of(model.backend, "prefill") as shapes, contextlib.closing(engine):
        with engine._lock:
            first = [engine.submit(p, max_new_tokens=4) for p in prompts[:3]]
        [h.result(timeout=60) for h in first]
        second = []
        for p in prompts[3:]:
            second.append(engine.submit(p, max_new_tokens=4))
            time.sleep(0.03)
        results = [h.result(timeout=60) for h in second]
    assert shapes[0] == (3, 10)
    assert shapes[1] == ((3, 10) if wait else (1, 10))
    for p, got in zip(prompts[3:], results):
        assert got.output_ids == model.generate(p, max_new_tokens=4)[0].output_ids


def test_requests_that_arrive_while_a_wave_is_prefilled_join_it_before_its_first_step(model):
    """The first request is prefilled alone (nothing else is there yet); three more arrive during that call. They
    are prefilled together before anybody decodes, so all four decode in step from their first token on (and end
    at one step): the running row's next token waits for the wave instead of every newcomer stalling it later."""
    engine = Engine(model, EngineConfig(max_running=4))
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 300) for _ in range(12)] for _ in range(4)]
    later = []

    def arrive(method, shape):
        if method == "prefill" and not later:
            later.extend(engine.submit(p, max_new_tokens=5) for p in prompts[1:])

    with call_log(model.backend, "prefill", "decode", hook=arrive) as log, contextlib.closing(engine):
        first = engine.submit(prompts[0], max_new_tokens=5)
        results = [first.result(timeout=60)] + [h.result(timeout=60) for h in later]
    assert log[:3] == [("prefill", (1, 12)), ("prefill", (3, 12)), ("decode", (4, 1))]
    assert [shape for _, shape in log[3:]] == [(4, 1)] * 3  # in step to the end
    for p, got in zip(prompts, results):
        assert got.output_ids == model.generate(p, max_new_tokens=5)[0].output_ids


def test_a_wave_of_prompts_longer_than_one_call_is_prefilled_whole_before_its_first_step(model):
    """Three 40-token prompts arrive together; with 16-token prefill calls each takes three. Nobody decodes until
    all three are prefilled, and then they decode in step to the end (before, the first to finish decoded at once
    and the others, made to wait for its end, took turns with it)."""
    engine = Engine(model, EngineConfig(max_running=3, prefill_chunk=16, busy_prefill_chunk=16, prefix_cache=0))
    rng = random.Random(14)
    prompts = [[rng.randrange(1, 300) for _ in range(40)] for _ in range(3)]
    with call_log(model.backend, "prefill", "decode") as log, contextlib.closing(engine):
        with engine._lock:
            handles = [engine.submit(p, max_new_tokens=6) for p in prompts]
        results = [h.result(timeout=60) for h in handles]
    steps = [i for i, (m, shape) in enumerate(log) if m == "decode" and shape[1] == 1]
    assert sum(shape[1] for m, shape in log[: steps[0]]) == 3 * 40  # every prompt token before the first step
    assert [log[i][1] for i in steps] == [(3, 1)] * 5
    for p, got in zip(prompts, results):
        assert got.output_ids == model.generate(p, max_new_tokens=6)[0].output_ids


def test_while_rows_decode_each_step_waits_for_one_prefill_call_at_most(model):
    """Three cache hits of 8 tokens of their own arrive while a request decodes: they fit one busy_prefill_chunk
    together, but each call reads all the weights, so the running row's steps take them one at a time (the portable
    graph runs them as one stacked call). Outputs are exact."""
    engine = Engine(model, EngineConfig(max_running=4, regroup_wait=0))
    rng = random.Random(13)
    system = [rng.randrange(1, 300) for _ in range(40)]
    running = [rng.randrange(1, 300) for _ in range(12)]
    hits = [system + [rng.randrange(1, 300) for _ in range(8)] for _ in range(3)]
    late = []

    def arrive(method, shape):
        steps = sum(m == "decode" and s[1] == 1 for m, s in log)
        if method == "decode" and steps == 2 and not late:
            late.extend(engine.submit(p, max_new_tokens=4) for p in hits)

    with contextlib.closing(engine):
        engine.submit(system + [1], max_new_tokens=1).result(timeout=60)  # caches the system prompt
        with call_log(model.backend, "prefill", "decode", hook=arrive) as log:
            first = engine.submit(running, max_new_tokens=30)
            results = [first.result(timeout=60)] + [h.result(timeout=60) for h in late]
    assert [h.cached_tokens for h in late] == [32] * 3
    steps = [i for i, (m, shape) in enumerate(log) if m == "decode" and shape[1] == 1]
    between = [b - a - 1 for a, b in zip(steps, steps[1:])]
    assert max(between) == 1, log
    for p, n, got in zip([running, *hits], [30, 4, 4, 4], results):
        assert got.output_ids == model.generate(p, max_new_tokens=n)[0].output_ids


def test_a_newcomer_waits_for_a_batch_that_ends_sooner_than_its_prefill_would_take(exported):
    """A long prompt that arrives one step before the running request ends waits for that step (its prefill would
    stall the running request longer than the wait costs it); a short one that arrives with steps to go starts at
    once. The engine decides on its own measured step and prefill times; outputs are exact either way."""
    model = load(exported("cpu-neo", tiny_neo(), target="cpu")[1])
    engine = Engine(model, EngineConfig(max_running=2, prefix_cache=0))
    rng = random.Random(12)
    running, long, short = ([rng.randrange(1, 300) for _ in range(n)] for n in (40, 110, 3))
    newcomers = {}

    def arrive(method, shape):
        steps = sum(m == "decode" for m, _ in log)
        if method == "decode" and steps == 1:
            newcomers["short"] = engine.submit(short, max_new_tokens=2)  # 4 steps left: starts at once
        if method == "decode" and steps == 4:
            newcomers["long"] = engine.submit(long, max_new_tokens=2)  # 1 step left: waits for it

    with call_log(model.backend, "prefill", "decode", hook=arrive) as log, contextlib.closing(engine):
        first = engine.submit(running, max_new_tokens=6)
        got = first.result(timeout=60), newcomers["short"].result(timeout=60), newcomers["long"].result(timeout=60)

    def steps_before(index):
        return [m for m, _ in log[:index]].count("decode")

    short_at = log.index(("prefill", (1, 3)))
    long_at = [i for i, (m, _) in enumerate(log) if m == "prefill"][2]  # after the running one's and the short
    assert steps_before(short_at) == 1  # right after the step it arrived in
    assert log[long_at] == ("prefill", (1, 110)) and steps_before(long_at) == 5  # after the last step, whole
    for prompt, result, n in zip((running, short, long), got, (6, 2, 2)):
        assert result.output_ids == model.generate(prompt, max_new_tokens=n)[0].output_ids


def test_engine_config_from_text_reads_numbers_and_refuses_the_rest():
    """Ray's `serve run … key=value` arguments arrive as text: integers and seconds are read as such."""
    config = EngineConfig.from_strings({"max_running": "4", "regroup_wait": "0.05", "kv_budget": "2GiB"})
    assert (config.max_running, config.regroup_wait, config.kv_budget) == (4, 0.05, "2GiB")
    with pytest.raises(UsageError, match="regroup_wait must be a number"):
        EngineConfig.from_strings({"regroup_wait": "soon"})
    with pytest.raises(UsageError, match="--regroup-wait .* between 0 and 1"):
        EngineConfig(regroup_wait=5)
