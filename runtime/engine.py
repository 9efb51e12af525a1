"""Continuous batching: one model, one thread stepping the running set one token at a time.

    engine = Engine(load("artifact/"), EngineConfig(max_running=8))
    handle = engine.submit("Hello", SamplingParams(max_new_tokens=16))
    for delta in handle:            # or `async for` in an event loop; handle.cancel() frees the slot
        print(delta.text, end="")
    engine.close()

At every step boundary finished sequences (eos, stop id or string, length, cancel) leave the batch and waiting
requests are admitted and prefilled: those that arrive together in one left-padded call (_group), a long prompt
in chunks (`prefill_chunk` while nothing decodes; while others do, one call of at most `busy_prefill_chunk` tokens
per step, so their next token never waits for more than one), prompts the prefix cache serves from their cached
prefix; their caches then join the decode batch (runtime/batch.py). Requests are kept in waves that decode in step:
requests that arrive while a wave is prefilled join it before its first step (_wave_grows), newcomers wait for a
batch that ends sooner than their prefill would take (_waits_for_end), and after a batch ends at one step the loop
waits briefly for its clients' next requests (_regroup). A wave's rows then never wait for a newcomer's prefill
between two tokens. A request yields exactly what `Model.generate` yields for it alone: the same Sequence (sampler
with its own RNG, text stream, stop rules) runs it.

Memory: the KV cache of the running slots is allocated once, up front, on the CPU target (in-place cache):
    bytes = 2 (key, value) x layers x max_running x capacity x hidden_size x bytes per element (4 fp32, 2 fp16)
where capacity (tokens per sequence: prompt + max_new_tokens) = min(max_context, kv_budget / max_running).
The portable graph concatenates its cache every step (that is the graph's contract), within the same bound.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from neodeploy.core.errors import ClosedError, NeodeployError, OverloadedError, UsageError
from neodeploy.runtime.batch import DecodeBatch
from neodeploy.core.files import parse_size
from neodeploy.core.manifest import Manifest
from neodeploy.runtime.prefix import Hit, PrefixCache
from neodeploy.runtime.sampling import SamplingParams
from neodeploy.runtime.sequence import Delta, Generation, Sequence
from neodeploy.runtime.speculate import check_tokens

def parse_kv_budget(budget: int | str | None, manifest: Manifest) -> int | None:
    """Tokens from `4096` / `"4096"` (tokens) or `"512MiB"` / `"2GB"` (bytes, divided by the per-token size)."""
    if budget is None or isinstance(budget, int) and not isinstance(budget, bool):
        tokens = budget
    elif str(budget).strip().isdigit():
        tokens = int(str(budget).strip())
    else:
        size = parse_size(budget)
        if size is None:
            raise UsageError(f"kv budget {budget!r} is neither a token count (4096) nor a size (512MiB, 2GB)")
        tokens = size // manifest.kv_bytes_per_token
    if tokens is not None and tokens < 1:
        raise UsageError(f"kv budget {budget!r} holds no token; give at least one sequence's worth")
    return tokens


def parse_prefix_cache(value: int | str | None, running_bytes: int | None = None) -> int:
    """Bytes for the prefix cache: "auto" (as much as the running slots' KV cache, running_bytes, at most 1 GiB
    and a tenth of this machine's memory), 0 / None (off), a byte count, or a size ("512MiB")."""
    if value is None or value is False:
        return 0
    if value == "auto":
        try:
            import os

            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 8 << 30
        return min(1 << 30, memory // 10, running_bytes or 1 << 30)
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif str(value).strip().isdigit():
        size = int(str(value).strip())
    else:
        size = parse_size(value)
    if size is None or size < 0:
        raise UsageError(f"--prefix-cache (prefix_cache) {value!r} is not a size: give 512MiB, 2GB, a byte count, 0 (off) "
                         "or auto")
    return size


def survivors(rows: int, gone: set[int]) -> list[int]:
    """The order the remaining rows take: each freed row is filled from the end, so the fewest rows move (moving a
    row copies its whole cache; closing every gap in order moved half the batch each time a request finished)."""
    count = rows - len(gone)
    order = [i for i in range(count)]
    movers = [r for r in range(count, rows) if r not in gone]
    for hole, row in zip([i for i in range(count) if i in gone], movers):
        order[hole] = row
    return order


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 8  # sequences decoded together
    max_waiting: int = 64  # queued requests beyond the running ones; past it submit raises OverloadedError
    kv_budget: int | str | None = None  # tokens over all running slots, or bytes ("2GiB"); default max_context each
    # prompt tokens per prefill call while nothing is decoding (or every running row has only just taken its first
    # token): one prompt's chunk, or several fresh prompts prefilled together (rows x the longest, padding
    # included). A wave of 8 x 128-token prompts runs as two calls of 4 before its first step: its first half
    # answers in half the time (pythia-160m, 8 clients: TTFT p50 ~320 ms against ~460 with 1024 in one call)
    prefill_chunk: int = 512
    # ... and while others decode, the tokens of the one prefill call made between two of their steps: bounds how
    # long a newcomer delays their next token (pythia-160m, 8 clients: 64 halved the p99 gap between tokens,
    # 200 -> 90 ms, for 8 % less throughput than 256; docs/benchmarks.md)
    busy_prefill_chunk: int = 64
    # After several requests end at the same step (clients in a loop, a batch job), wait up to this many seconds for
    # their next requests so they are prefilled together and decode in step: their token gaps then never include
    # a newcomer's prefill (see _regroup). 0: start the first arrival at once
    regroup_wait: float = 0.02
    prefix_cache: int | str | None = "auto"  # bytes of reusable prompt KV (runtime/prefix.py); 0 or None: off
    # "ngram" (prompt lookup) or a draft artifact's folder: a request decoding alone drafts this many tokens a step
    # and the model checks them in one call (runtime/speculate.py; exact). None: off
    speculate: str | None = None
    speculate_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "prefill_chunk", "busy_prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_waiting" else 1):
                raise UsageError(f"{name} must be a {'non-negative' if name == 'max_waiting' else 'positive'} integer, got {value!r}")
        if not isinstance(self.regroup_wait, (int, float)) or isinstance(self.regroup_wait, bool) or not 0 <= self.regroup_wait <= 1:
            raise UsageError(f"--regroup-wait (regroup_wait) must be seconds between 0 and 1 (0: never wait), "
                             f"got {self.regroup_wait!r}")
        parse_prefix_cache(self.prefix_cache)
        check_tokens(self.speculate_tokens)

    @classmethod
    def from_strings(cls, values: dict[str, Any]) -> EngineConfig:
        """From text such as `serve run … max_running=4 kv_budget=2GiB`: a field whose default is an integer (a
        float) reads an integer (a number); sizes and names stay text (each field's own parser reads them). Absent
        fields keep their defaults; names that are no field are the caller's to refuse."""
        given = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            number = type(f.default) if type(f.default) in (int, float) else None
            if number is not None and isinstance(value, str):
                try:
                    value = number(value)
                except ValueError:
                    raise UsageError(f"{f.name} must be {'an integer' if number is int else 'a number'}, "
                                     f"got {value!r}") from None
            given[f.name] = value
        return cls(**given)


class EngineObserver:
    """Hooks for metrics (the server's Prometheus collectors); called from the engine thread."""

    def step(self, batch_size: int, seconds: float) -> None: ...

    def token(self, handle: Handle, first: bool, seconds: float) -> None: ...

    def finished(self, handle: Handle, reason: str) -> None: ...

    def prefix(self, query_tokens: int, hit_tokens: int) -> None: ...

    def speculated(self, drafted: int, accepted: int) -> None: ...


_END = object()


class Handle:
    """One submitted request: iterate its Deltas (blocking, or `async for`), cancel it, or wait for its result."""

    def __init__(self, engine: Engine, request_id: int, sequence: Sequence):
        self.engine, self.id, self.sequence = engine, request_id, sequence
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._finished = threading.Event()

    @property
    def prompt_ids(self) -> list[int]:
        return self.sequence.prompt_ids

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop generating at the next step boundary; the slot is freed and the finish reason is 'cancelled'."""
        self.engine._cancel(self)

    # ------------------------------------------------------------------------------------- engine side

    def _push(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            if item is _END:
                self._finished.set()
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its reader is gone
                pass

    # ------------------------------------------------------------------------------------- reader side

    def _next(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no token within the timeout")
            item = self._items.popleft()
            if item is _END:
                self._items.appendleft(item)  # stays at the end for any later reader
            return item

    def __iter__(self) -> Iterator[Delta]:
        while (item := self._next()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    item = self._items.popleft() if self._items else None
                    if item is _END:
                        self._items.appendleft(item)
                    if item is None:
                        event.clear()
                if item is None:
                    await event.wait()
                    continue
                if item is _END:
                    break
                yield item
        finally:
            with self._cond:
                self._waiters.remove((loop, event))
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end and return the Generation (raises the request's error, if it failed)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.sequence.result()


class _Entry:
    def __init__(self, handle: Handle):
        self.handle, self.batch = handle, None
        self.alone = False  # its group's prefill failed: it is prefilled on its own
        self.joined = -1  # the engine's decode step count when it joined the running batch

    def steps_left(self) -> int:
        """Decode steps before its max_new_tokens ends it (eos or a stop may end it sooner)."""
        sequence = self.handle.sequence
        return sequence.params.max_new_tokens - sequence.steps


class Engine:
    """Owns one loaded Model; `submit` from any thread or task. Runs its own thread until `close`."""

    def __init__(self, model, config: EngineConfig | None = None, observer: EngineObserver | None = None):
        self.model, self.config, self.observer = model, config or EngineConfig(), observer or EngineObserver()
        backend = model.backend
        self.max_running = self.config.max_running if backend.joinable else 1
        _, _, max_context = model.limits()
        budget = parse_kv_budget(self.config.kv_budget, model.manifest)
        self.capacity = min(max_context, budget // self.max_running) if budget else max_context
        if self.capacity < 2:
            raise UsageError(f"kv budget {self.config.kv_budget!r} leaves {self.capacity} token(s) per sequence "
                             f"for {self.max_running} running sequences; raise it or lower max_running")
        pooled = backend.joinable and backend.in_place
        self.kv_bytes = model.manifest.kv_bytes_per_token * self.max_running * self.capacity
        self.prefix = self._prefix_cache(model) if backend.joinable else None  # it moves KV in and out of batches
        self._batch = DecodeBatch(backend, self.max_running if pooled else 0, self.capacity)
        if pooled:  # allocated once, up front: decoding never allocates cache memory
            self._batch.state = backend.new_cache(self.max_running, self.capacity)
            backend.set_rows(self._batch.state, 0)
        speculate = self.config.speculate
        self.speculator = model.speculation(speculate, self.config.speculate_tokens)() if speculate else None
        self._running: list[_Entry] = []
        self._prefilling: list[_Entry] = []
        self._waiting: collections.deque[_Entry] = collections.deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Condition()
        self._closing = False
        self._next_id = 0
        self._active = 0  # submitted and not finished
        self._held = False  # the backend's lock, for exclusive backends, while a request runs
        self._ended: tuple[int, float] = (0, 0.0)  # requests that ended the batch at the last step, and when
        self._steps = 0  # decode steps taken (a row joined at the current count has not decoded yet)
        # Measured here, for _waits_for_end: seconds of the last decode steps, and of prefill per prompt token
        self._step_seconds: float | None = None
        self._prefill_seconds: float | None = None
        self._thread = threading.Thread(target=self._loop, name="neodeploy-engine", daemon=True)
        self._thread.start()

    def _prefix_cache(self, model) -> PrefixCache | None:
        backend, quantization = model.backend, model.manifest.quantization
        budget = parse_prefix_cache(self.config.prefix_cache, self.kv_bytes)
        if self.config.prefix_cache == "auto" and quantization is not None and quantization.depends_on_batch:
            # A prefix's keys depend on the call that computed them, as a batch's tokens do: int8 scales the whole
            # call, and int4's rounding magnifies the last-bit differences of a call of another shape. Reuse would
            # not be exact: off unless a size is given (the serve gate then checks it on this machine).
            return None
        if not budget:
            return None
        layout = (len(backend.past_names), backend.num_heads, backend.head_dim)
        cache = PrefixCache(budget, layout=layout, dtype=backend.kv_dtype)
        if cache.slots >= 1:
            return cache
        if self.config.prefix_cache == "auto":
            return None  # running slots smaller than one block (a tiny --kv-budget): nothing to reuse anyway
        raise UsageError(f"--prefix-cache (prefix_cache) {self.config.prefix_cache!r} holds no {cache.block}-token "
                         f"block of this model (one is {cache.block_bytes} bytes): give at least "
                         f"{-(-cache.block_bytes // 1024)}KiB, or 0 to turn the cache off")

    # ------------------------------------------------------------------------------------- clients

    @property
    def running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt, params: SamplingParams | None = None, **options: Any) -> Handle:
        """Queue one request. Raises UsageError (bad prompt or parameters, too long), OverloadedError (the
        waiting queue is full) or ClosedError (draining); nothing is queued then."""
        model = self.model
        params = model.params(params, **options)
        encoded = model.encode_all(prompt)
        if len(encoded) != 1:
            raise UsageError("submit takes one prompt; submit each prompt of a batch on its own")
        ids = encoded[0]
        model.check_fits(1, len(ids), params, context=self.capacity)
        sequence = model.sequence(ids, params)
        with self._lock:
            if self._closing:
                raise ClosedError("the engine is shutting down and takes no new requests")
            # Counted over unfinished requests, not the loop's lists: a request that just finished leaves its
            # slot before the loop has retired its row.
            if self._active >= self.max_running + self.config.max_waiting:
                raise OverloadedError(f"{self.max_running} running and {self.config.max_waiting} waiting requests "
                                      "fill the engine (max_running + max_waiting); retry later")
            self._active += 1
            self._next_id += 1
            handle = Handle(self, self._next_id, sequence)
            self._waiting.append(_Entry(handle))
            self._lock.notify_all()
        return handle

    def generate(self, prompt, params: SamplingParams | None = None, **options: Any) -> Generation:
        return self.submit(prompt, params, **options).result()

    def close(self, timeout: float | None = None, cancel: bool = True) -> None:
        """Stop taking requests; in-flight ones finish (or, with cancel, end as 'cancelled' after `timeout`)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive() and cancel:
            self.cancel_all()
            self._thread.join()

    def cancel_all(self) -> tuple[int, int]:
        """Cancel every request in flight (each ends as 'cancelled' at the next step boundary); returns how many were
        (running, waiting) then. A server's drain calls it when the grace period is over."""
        with self._lock:
            started = [*self._running, *self._prefilling]
            for entry in [*started, *self._waiting]:
                self._cancelled.add(entry.handle.id)
            self._lock.notify_all()
            return len(started), len(self._waiting)

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            if not handle.done:
                self._cancelled.add(handle.id)
                self._lock.notify_all()

    # ------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._running or self._prefilling or self._closing)
                if not self._running and all(entry.batch is None for entry in self._prefilling):
                    self._regroup()
                if self._closing and not (self._waiting or self._running or self._prefilling):
                    return
                cancelled, self._cancelled = self._cancelled, set()
                while self._waiting and len(self._running) + len(self._prefilling) < self.max_running:
                    self._prefilling.append(self._waiting.popleft())
                waiting_cancelled = [e for e in self._waiting if e.handle.id in cancelled]
                for entry in waiting_cancelled:
                    self._waiting.remove(entry)
            for entry in waiting_cancelled:
                self._finish(entry, entry.handle.sequence.cancel())
            try:
                self._retire([i for i, e in enumerate(self._running) if e.handle.id in cancelled], cancel=True)
                for entry in [e for e in self._prefilling if e.handle.id in cancelled]:
                    self._prefilling.remove(entry)
                    self._finish(entry, entry.handle.sequence.cancel())
                self._prefill()
                if not self._wave_grows():
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the engine
                self._fail(self._running, exc)
                self._running = []
                self._batch.keep([])
            if self._held and not (self._running or self._prefilling):
                self._held = False
                self.model.backend.lock.release()

    def _regroup(self) -> None:
        """Idle with requests waiting: if several requests ended together a moment ago, wait (up to regroup_wait
        from then) until as many have arrived, so they start together. Called holding the lock."""
        ended, at = self._ended
        self._ended = (0, 0.0)
        want = min(ended, self.max_running)

        def arrived() -> bool:
            return len(self._waiting) + len(self._prefilling) >= want or self._closing

        if ended >= 2 and not arrived():
            self._lock.wait_for(arrived, max(0.0, at + self.config.regroup_wait - time.perf_counter()))

    def _take_backend(self) -> None:
        if self.model.backend.exclusive and not self._held:
            self.model.backend.lock.acquire()
            self._held = True

    def _prefill(self) -> None:
        if self._waits_for_end():
            return
        busy = bool(self._running) and not self._wave_open()
        budget = self.config.busy_prefill_chunk if busy else self.config.prefill_chunk
        while used := self._prefill_group(budget):
            if busy:
                return  # one call per step while rows decode (see below)
            # While every running row has only just taken its first token, the requests that arrived with them
            # are prefilled too, a call of up to prefill_chunk tokens each, before the wave's first decode step:
            # the wave then decodes in step and ends at one step, and its next requests start together again.
            budget = self.config.prefill_chunk if self._wave_open() else budget - used
        ready: list[_Entry] = []  # prefilled and going on: they join the batch after this pass
        for entry in list(self._prefilling):
            if budget <= 0:
                break
            try:
                self._take_backend()
                start = time.perf_counter()
                logits, used = self._prefill_chunk(entry, budget)
                self._timed_prefill(used, time.perf_counter() - start)
                # While rows decode, one call per step: a call costs mostly its read of the weights, whatever its
                # tokens (a cache hit's 16 cost ~38 ms on pythia-160m, a 64-token chunk ~60), so four hits within
                # one 64-token budget held every running row's next token for ~150 ms.
                budget = 0 if busy else budget - used
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self._prefilling.remove(entry)
                self._fail([entry], exc)
                continue
            if logits is None:
                continue  # more chunks to come
            self._prefilling.remove(entry)
            going = self._first_token(entry, logits[0])
            self._keep_prefix(entry.handle.prompt_ids, lambda: self.model.backend.cache_arrays(
                entry.batch.state, 1, len(entry.handle.prompt_ids)))
            if going:
                ready.append(entry)
            else:
                entry.batch = None
        # Joined once the pass is done: copying a row into the batch (3 ms for 528 tokens of pythia-160m) then
        # delays nobody's first token (cache hits arriving together run one after another).
        for entry in ready:
            self._batch.join(entry.batch)
            entry.batch = None
        self._join(ready)

    def _prefill_group(self, budget: int) -> int:
        """One call for several requests within budget tokens: fresh prompts prefilled together, else cache hits
        resumed together. Returns the tokens run; 0 where no group of two or more formed."""
        group = self._group(budget)
        if len(group) > 1:
            return self._prefill_together(group)
        group = self._hit_group(budget)
        if len(group) > 1:
            return self._resume_together(group)
        return 0

    def _wave_open(self) -> bool:
        """Rows run and none has decoded yet: all took their first token at this step boundary."""
        return bool(self._running) and all(entry.joined == self._steps for entry in self._running)

    def _wave_grows(self) -> bool:
        """A wave is still being prefilled: requests that arrived with it are admitted but not done (a prompt longer
        than one call's prefill_chunk runs in several), or arrived, with room for them, while it was prefilled. They
        join it before its first decode step, so arrivals a few milliseconds apart still start in step; before, a
        wave of four 528-token prompts split in pairs that then took turns (the second pair waited for the first to
        end), every request waiting out another pair's prefill and decoding."""
        with self._lock:
            room = len(self._running) + len(self._prefilling) < self.max_running
            return self._wave_open() and (bool(self._prefilling) or (room and bool(self._waiting)))

    def _waits_for_end(self) -> bool:
        """Newcomers wait for a running batch that ends (by its rows' max_new_tokens) sooner than their prefill
        would take: holding them costs them less than their prefill would stall every running row, and they
        then start together with the batch's own next requests, in one call and in step (clients in a loop
        drift apart otherwise, one straggler's prefill at a time). A request whose prefill has begun goes on.
        Estimates are this engine's measured step and prefill times; before it has both, nobody waits."""
        if not self._running or not self._prefilling or self._step_seconds is None or self._prefill_seconds is None:
            return False
        if self._wave_open():
            return False  # they arrived with the wave: they start with it
        if any(entry.batch is not None for entry in self._prefilling):
            return False
        ends_in = max(entry.steps_left() for entry in self._running) * self._step_seconds
        prefill = sum(max(self._step_seconds, self._tokens_to_run(entry) * self._prefill_seconds)
                      for entry in self._prefilling)
        return ends_in <= prefill

    def _tokens_to_run(self, entry: _Entry) -> int:
        """Prompt tokens a waiting request still has to prefill (its cached prefix and run chunks excluded)."""
        done = int(entry.batch.lengths[0]) if entry.batch is not None else self._reusable(entry)
        return len(entry.handle.prompt_ids) - done

    def _timed_prefill(self, tokens: int, seconds: float) -> None:
        """Learn the prefill rate from calls large enough to show it (a few tokens cost a whole weight read)."""
        if tokens >= 32:
            rate = seconds / tokens
            self._prefill_seconds = rate if self._prefill_seconds is None else 0.7 * self._prefill_seconds + 0.3 * rate

    def _group(self, budget: int) -> list[_Entry]:
        """Fresh requests to prefill in one call, as many as fit the budget (rows x the longest prompt, padding
        included): one call reads the weights once for all of them, and requests that arrive together start
        decoding together. Left out: a request the prefix cache serves (it resumes on its own), and one that
        starts with the same block as a member (it waits to reuse that member's prefix instead of computing it)."""
        group: list[_Entry] = []
        starts: set[tuple[int, ...]] = set()
        width = 0
        for entry in self._prefilling:
            prompt = entry.handle.prompt_ids
            start = tuple(prompt[: self.prefix.block]) if self.prefix is not None else ()
            if entry.batch is not None or entry.alone or (start and start in starts):
                continue
            if max(width, len(prompt)) * (len(group) + 1) > budget:
                break
            if self._reusable(entry):
                continue
            group.append(entry)
            starts.add(start)
            width = max(width, len(prompt))
        return group

    def _prefill_together(self, group: list[_Entry]) -> int:
        """Prefill the group's prompts left-padded in one call; each takes its first token and the ones that go on
        join the running batch together. Returns the tokens run (padding included)."""
        for entry in group:
            self._prefilling.remove(entry)
        prompts = [entry.handle.prompt_ids for entry in group]
        width = max(len(p) for p in prompts)
        batch = DecodeBatch(self.model.backend)
        try:
            self._take_backend()
            start = time.perf_counter()
            logits = batch.prefill(prompts, self.model.pad_token_id, capacity=width)
            self._timed_prefill(len(group) * width, time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - each is tried alone next, so a request that fails fails on its own
            self._retry_alone(group)
        else:
            self._start(group, batch, logits)
        return len(group) * width

    def _hit_group(self, budget: int) -> list[_Entry]:
        """Fresh requests the prefix cache serves with the same reuse and the same number of tokens of their own
        (clients sharing a system prompt): their own tokens run in one call, as many rows as fit the budget."""
        if not self.model.backend.extends_rows:
            return []
        groups: dict[tuple[int, int], list[_Entry]] = {}
        for entry in self._prefilling:
            reused = self._reusable(entry) if entry.batch is None and not entry.alone else 0
            if reused:
                groups.setdefault((reused, len(entry.handle.prompt_ids) - reused), []).append(entry)
        if not groups:
            return []
        (_, rest), group = max(groups.items(), key=lambda item: len(item[1]))
        return group[: max(1, budget // rest)]

    def _resume_together(self, group: list[_Entry]) -> int:
        """The group's cached prefixes stacked as rows, their own tokens run in one call; the rows that go on join
        the running batch together. Returns the tokens run."""
        for entry in group:
            self._prefilling.remove(entry)
        hits = [self._lookup(entry) for entry in group]  # the same reuse each: nothing was stored since the match
        reused = hits[0].tokens if hits[0] is not None else 0
        rests = [entry.handle.prompt_ids[reused:] for entry in group]
        for entry in group:
            entry.handle.cached_tokens = reused
        batch = DecodeBatch(self.model.backend)
        try:
            if any(hit is None or hit.tokens != reused for hit in hits):
                raise RuntimeError("the prefix cache changed between match and lookup")
            self._take_backend()
            start = time.perf_counter()
            batch.resume(Hit.stack(hits), rests, capacity=reused + len(rests[0]))
            logits = batch.advance(len(rests[0]))
            self._timed_prefill(len(group) * len(rests[0]), time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - each is tried alone next (from scratch), so a failure is its own
            self._retry_alone(group)
        else:
            self._start(group, batch, logits)
        return len(group) * len(rests[0])

    def _retry_alone(self, group: list[_Entry]) -> None:
        """A group's call failed: its requests go back to the front, each to be prefilled on its own."""
        for entry in reversed(group):
            entry.alone, entry.handle.cached_tokens = True, 0
            self._prefilling.insert(0, entry)

    def _start(self, group: list[_Entry], batch: DecodeBatch, logits: np.ndarray) -> None:
        """A prefilled batch of new requests: each takes its first token, then offers its prompt to the prefix
        cache; the rows that go on join the running batch together."""
        going = [row for row, entry in enumerate(group) if self._first_token(entry, logits[row])]
        for row, entry in enumerate(group):  # after the first tokens: copying KV out need not delay them
            self._keep_prefix(entry.handle.prompt_ids, lambda: batch.row_cache(row))
        batch.keep(going)
        self._batch.join(batch)
        self._join([group[row] for row in going])

    def _join(self, entries: list[_Entry]) -> None:
        """Prefilled requests that go on join the running set (their caches joined the decode batch)."""
        for entry in entries:
            entry.joined = self._steps
        self._running.extend(entries)

    def _reusable(self, entry: _Entry) -> int:
        """Prompt tokens of a waiting request the prefix cache holds now (nothing copied)."""
        return self.prefix.match(entry.handle.prompt_ids) if self.prefix is not None else 0

    def _lookup(self, entry: _Entry) -> Hit | None:
        """The prefix cache's longest match for a request that starts now (counted; used before the next store)."""
        if self.prefix is None:
            return None
        hit = self.prefix.lookup(entry.handle.prompt_ids)
        self.observer.prefix(len(entry.handle.prompt_ids), hit.tokens if hit else 0)
        return hit

    def _keep_prefix(self, prompt: list[int], arrays) -> None:
        """Offer a prefilled prompt's KV to the prefix cache (arrays: a callable, so nothing is copied when off)."""
        if self.prefix is None:
            return
        try:
            self.prefix.store(prompt, arrays())
        except Exception:  # noqa: BLE001 - the cache is an optimisation: a failure to keep a prefix (memory)
            self.prefix.clear()  # costs later requests their reuse, never this request

    def _first_token(self, entry: _Entry, logits: np.ndarray) -> bool:
        """Sample a prefilled request's first token; True where it goes on decoding."""
        try:
            delta = entry.handle.sequence.feed(logits)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            self._fail([entry], exc)
            return False
        self._emit(entry, delta)
        return delta.finish_reason is None

    def _prefill_chunk(self, entry: _Entry, budget: int) -> tuple[np.ndarray | None, int]:
        """Run up to `budget` prompt tokens of one request: (logits once its prompt is done, tokens run). A new
        request starts from the longest cached prefix of its prompt, if any."""
        if entry.batch is not None:
            before = int(entry.batch.lengths[0])
            logits = entry.batch.advance(budget)
            return logits, int(entry.batch.lengths[0]) - before
        prompt = entry.handle.prompt_ids
        entry.batch = DecodeBatch(self.model.backend)
        hit = self._lookup(entry)
        if hit is None:
            logits = entry.batch.prefill([prompt], self.model.pad_token_id, capacity=len(prompt), chunk=budget)
            return logits, int(entry.batch.lengths[0])
        reused = entry.handle.cached_tokens = hit.tokens
        entry.batch.resume(hit, prompt[reused:], capacity=len(prompt))
        logits = entry.batch.advance(budget)
        return logits, int(entry.batch.lengths[0]) - reused

    def _decode(self) -> None:
        if not self._running or self._speculate():
            return
        start = time.perf_counter()
        tokens = np.array([e.handle.sequence.last_token for e in self._running], dtype=np.int64)
        logits = self._batch.step(tokens)
        seconds = time.perf_counter() - start
        self._steps += 1
        self._step_seconds = seconds if self._step_seconds is None else 0.7 * self._step_seconds + 0.3 * seconds
        self.observer.step(len(self._running), seconds)
        if self.speculator is not None and len(self._running) == 1:
            self.speculator.plain_step(seconds)  # what a speculative step has to beat
        finished, queued = [], len(self._waiting) + len(self._prefilling)
        for row, entry in enumerate(self._running):
            try:
                delta = entry.handle.sequence.feed(logits[row])
            except Exception as exc:  # noqa: BLE001 - one row's logits (NaN) fail its request, not the batch's
                self._fail([entry], exc)
                finished.append(row)
                continue
            self._emit(entry, delta)
            if delta.finish_reason is not None:
                finished.append(row)
        self._retire(finished, queued=queued)

    def _speculate(self) -> bool:
        """A speculative step for a request decoding alone (nobody waits to join it); False where none was taken."""
        if self.speculator is None or len(self._running) != 1 or self._prefilling or self._waiting:
            return False
        entry, start = self._running[0], time.perf_counter()
        step = self.speculator.step(self._batch, entry.handle.sequence)
        if step is None:
            return False
        deltas, drafted, accepted = step
        self._steps += 1
        self.observer.step(1, time.perf_counter() - start)
        self.observer.speculated(drafted, accepted)
        for delta in deltas:
            self._emit(entry, delta)
        if deltas[-1].finish_reason is not None:
            self._retire([0])
        return True

    def _retire(self, rows: list[int], cancel: bool = False, queued: int | None = None) -> None:
        """Drop finished rows. queued: requests waiting before these rows' ends reached their clients (a client
        may have sent its next request since: it is one of the rows, not one more to wait for in _regroup)."""
        if not rows:
            return
        if queued is None:
            queued = len(self._waiting) + len(self._prefilling)
        if cancel:
            for row in rows:
                entry = self._running[row]
                self._finish(entry, entry.handle.sequence.cancel())
        if len(rows) == len(self._running):  # the batch ended: its clients may be about to come back together
            self._ended = (len(rows) + queued, time.perf_counter())
        keep = survivors(len(self._running), set(rows))
        self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)

    def _emit(self, entry: _Entry, delta: Delta) -> None:
        handle, now = entry.handle, time.perf_counter()
        first = handle.first_token_at is None
        self.observer.token(handle, first, now - (handle.submitted if first else handle.last_token_at))
        if first:
            handle.first_token_at = now
        handle.last_token_at = now
        if delta.finish_reason is not None:
            self._finish(entry, delta)
        else:
            handle._push(delta)

    def _finish(self, entry: _Entry, delta: Delta) -> None:
        self._release()
        entry.handle._push(delta)
        self.observer.finished(entry.handle, delta.finish_reason or "error")
        entry.handle._push(_END)

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _fail(self, entries: list[_Entry], exc: BaseException) -> None:
        for entry in entries:
            self._release()
            entry.handle.error = exc if isinstance(exc, NeodeployError) else RuntimeError(f"generation failed: {exc}")
            entry.handle.sequence.text.finish("error")
            self.observer.finished(entry.handle, "error")
            entry.handle._push(_END)
