"""The decoding object: a batch of sequences stepped one token at a time, rows joining and leaving.

Rows share one cache width W and are right-aligned in it (left padding, mask 0), which is the layout both
graphs take (the portable graph and the CPU target's GroupQueryAttention, whose seqlens_k is W - 1 for every
row). Positions count real tokens only, so a row computes what it would alone. A row that joins is prefilled
on its own and moved into place. When rows leave, the columns every remaining row pads are dropped from a batch
that reallocates anyway; a preallocated pool drops them lazily (`_compact`: when it is out of room, or when they are
over half its width), because dropping moves every remaining row and, on the CPU target, re-rotates its keys
(pythia-160m, 8 rows: 21 ms, as long as a decode step, every time a request finished).

Moving a row along the cache axis is exact for everything but rotary applied *inside* the CPU target's
kernel, which rotates keys at their cache index: those keys are re-rotated by the shift (`RotaryTable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neodeploy.core.errors import UsageError

if TYPE_CHECKING:
    from neodeploy.runtime.prefix import Hit


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions count only real tokens, so a left-padded row sees exactly the positions it would alone."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [batch, longest] int64, each row right-aligned after pad_id / mask 0."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


class RotaryTable:
    """The cos / sin table the CPU target's kernel rotates keys with (fp32, as reference.rotary_cos_sin builds
    it), used to move rotated keys along the cache axis: un-rotate at the old index, rotate at the new one."""

    def __init__(self, rotary_dims: int, base: float, scaling_factor: float = 1.0):
        self.dims = rotary_dims
        exponent = np.arange(0, rotary_dims, 2, dtype=np.float32) / np.float32(rotary_dims)
        self.inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)
        if scaling_factor != 1.0:
            self.inv_freq = (self.inv_freq / np.float32(scaling_factor)).astype(np.float32)

    def _cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)

    def shift(self, keys: np.ndarray, start: int, stop: int, by: int) -> None:
        """keys [rows, heads, length, head_dim] whose columns start..stop were rotated at their index, now sit at
        index + by: rotate them in place to what the kernel would have written there."""
        if by == 0 or stop <= start:
            return
        half = self.dims // 2
        old_cos, old_sin = self._cos_sin(np.arange(start, stop) - by)
        new_cos, new_sin = self._cos_sin(np.arange(start, stop))
        x = keys[:, :, start:stop, : self.dims]
        x1, x2 = x[..., :half].astype(np.float32), x[..., half:].astype(np.float32)
        # Un-rotate (transpose of the rotation at the old index), then rotate at the new one.
        u1, u2 = x1 * old_cos + x2 * old_sin, x2 * old_cos - x1 * old_sin
        x[..., :half] = u1 * new_cos - u2 * new_sin
        x[..., half:] = u2 * new_cos + u1 * new_sin


class DecodeBatch:
    """Mask, positions and cache state of a running batch. `prefill` starts it from prompts (left-padded
    together), `step` feeds one token per row, `join` takes in the rows of another (freshly prefilled) batch,
    `keep` drops the rest. Joining and dropping need a backend whose cache can move (`backend.joinable`)."""

    def __new__(cls, backend, rows: int = 0, capacity: int = 0):
        if cls is DecodeBatch and backend.aligned:  # the CUDA target's layout: rows left-aligned (runtime/aligned.py)
            from neodeploy.runtime.aligned import AlignedBatch

            cls = AlignedBatch
        return super().__new__(cls)

    def __init__(self, backend, rows: int = 0, capacity: int = 0):
        self.backend = backend
        self.mask = np.zeros((0, 0), np.int64)
        self.lengths = np.zeros(0, np.int64)  # real tokens in the cache, per row
        self.state: Any = None
        self.capacity_rows, self.capacity = rows, capacity  # a preallocated pool (in-place cache), if > 0
        self.pending: np.ndarray | None = None  # prompt ids not yet run (chunked prefill)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    # ------------------------------------------------------------------------------------- prefill

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int, capacity: int, chunk: int | None = None) -> np.ndarray | None:
        """Start from prompts; returns last-position logits [rows, vocab], or None when `chunk` leaves part of a
        single prompt for `advance` (long prompts are run in chunks so other rows' steps can interleave)."""
        ids, mask = left_pad(prompts, pad_id)
        return self.start(ids, mask, capacity, chunk)

    def start(self, ids: np.ndarray, mask: np.ndarray, capacity: int, chunk: int | None = None) -> np.ndarray | None:
        """prefill() from ready-made left-padded arrays (golden cases carry their own)."""
        if chunk and ids.shape[1] > chunk:
            if ids.shape[0] != 1:
                raise UsageError("chunked prefill takes one prompt at a time")
            self.pending = ids[:, chunk:]
            ids, mask = ids[:, :chunk], mask[:, :chunk]
        logits, self.state = self.backend.prefill(ids, mask, position_ids(mask), capacity=capacity)
        self.mask, self.lengths = mask, mask.sum(1)
        return None if self.pending is not None else logits

    def resume(self, past: Hit, rest: Sequence[int] | Sequence[Sequence[int]], capacity: int) -> None:
        """Start a prefill from the prefix cache's past (past.rows rows of past.tokens) with the rest of each row's
        prompt pending (one list for one row; rests of one length for several): `advance` then runs it as it runs
        a chunked prefill's later chunks."""
        rows, m = past.rows, past.tokens
        self._load(past, max(capacity, m + 1))
        self.mask, self.lengths = np.ones((rows, m), np.int64), np.full(rows, m, np.int64)
        self.pending = np.asarray(rest, dtype=np.int64).reshape(rows, -1)

    def _load(self, past: Hit, capacity: int) -> None:
        """A cache holding exactly this past (room for `capacity` tokens where it is in place)."""
        if self.backend.in_place:
            self.state = self.backend.new_cache(past.rows, capacity)
            past.write_into(self.backend.cache_arrays(self.state, past.rows, past.tokens))
        else:
            self.state = self.backend.wrap_cache(past.arrays())

    def advance(self, chunk: int) -> np.ndarray | None:
        """Run the next chunk of a chunked prefill (its rows' pending tokens are of one length); returns the logits
        after the last one."""
        ids, self.pending = self.pending[:, :chunk], (self.pending[:, chunk:] if self.pending.shape[1] > chunk else None)
        logits = self._feed(ids, self.backend.decode)
        return None if self.pending is not None else logits

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        """Batch 1: feed several tokens after the cache in one call; logits after the last [1, vocab]."""
        return self._feed(np.asarray([list(tokens)], dtype=np.int64), self.backend.decode)

    # ------------------------------------------------------------------------------------- speculation

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """Batch 1: feed the last sampled token and the drafted ones after it in one call; logits at every one of
        those positions [len(tokens), vocab] (a graph with several logits positions: backend.verifies)."""
        if self.rows != 1:
            raise UsageError("speculative verification runs at batch 1")
        return self._feed(np.asarray([list(tokens)], dtype=np.int64), self.backend.verify)[0]

    def rollback(self, count: int) -> None:
        """Batch 1: forget the last `count` cached tokens (drafts the sampler did not take). An in-place cache stops
        reading them (the next call overwrites them); a concatenated one is cut to the kept length."""
        if count <= 0:
            return
        width = self.width - count
        self.mask, self.lengths = self.mask[:, :width], self.lengths - count
        if not self.backend.in_place:
            kept = [a[:, :, :width] for a in self.backend.cache_arrays(self.state, 1, width + count)]
            self.state = self.backend.wrap_cache(kept)

    def _feed(self, ids: np.ndarray, run) -> np.ndarray:
        mask = np.concatenate([self.mask, np.ones_like(ids)], axis=1)
        logits, self.state = run(ids, mask, position_ids(mask)[:, -ids.shape[1] :], self.state)
        self.mask, self.lengths = mask, self.lengths + ids.shape[1]
        return logits

    # ------------------------------------------------------------------------------------- decode

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [rows] -> next logits [rows, vocab]."""
        if self.capacity_rows and self.width + 1 > self.capacity:
            self._compact()
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1)
        self.lengths = self.lengths + 1
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        logits, self.state = self.backend.decode(ids, self.mask, (self.lengths - 1)[:, None], self.state)
        return logits

    # ------------------------------------------------------------------------------------- rows

    def join(self, other: DecodeBatch) -> None:
        """Append other's rows (other is consumed). Aligns both to the wider of the two widths."""
        if other.rows == 0:
            return
        if self.rows == 0 and self.capacity_rows == 0:
            self.mask, self.lengths, self.state = other.mask, other.lengths, other.state
            return
        width = max(self.width, other.width)
        n, m = self.rows, other.rows
        theirs = self.backend.cache_arrays(other.state, other.rows, other.width)
        if self.capacity_rows:  # a preallocated in-place pool: move rows within it, no allocation
            if width >= self.capacity and self.width > other.width:
                self._compact()
                width = max(self.width, other.width)
            if n + m > self.capacity_rows or width >= self.capacity:
                raise UsageError(f"the batch pool ({self.capacity_rows} rows x {self.capacity} tokens) is full")
            if self.state is None:
                self.state = self.backend.new_cache(self.capacity_rows, self.capacity)
            pool = self.backend.cache_arrays(self.state, self.capacity_rows, self.capacity)
            self._shift(pool, n, self.width, width - self.width)
            for p, t in zip(pool, theirs):
                p[n : n + m, :, : width - other.width] = 0
                p[n : n + m, :, width - other.width : width] = t[:, :, : other.width]
            self._rotate(pool, slice(n, n + m), width - other.width, width, width - other.width)
            self.backend.set_rows(self.state, n + m)
        else:
            mine = self.backend.cache_arrays(self.state, n, self.width) if n else None
            merged = []
            for i, t in enumerate(theirs):
                a = np.zeros((n + m, *t.shape[1:2], width, t.shape[3]), dtype=t.dtype)
                if n:
                    a[:n, :, width - self.width :] = mine[i]
                a[n:, :, width - other.width :] = t[:, :, : other.width]
                merged.append(a)
            self._rotate(merged, slice(0, n), width - self.width, width, width - self.width)
            self._rotate(merged, slice(n, n + m), width - other.width, width, width - other.width)
            self.state = self.backend.wrap_cache(merged)
        self._consume(other)

        def pad(mask, w):
            return np.concatenate([np.zeros((mask.shape[0], w - mask.shape[1]), np.int64), mask], axis=1)

        self.mask = np.concatenate([pad(self.mask, width), pad(other.mask, width)], axis=0)
        self.lengths = np.concatenate([self.lengths, other.lengths])

    def _consume(self, other: DecodeBatch) -> None:
        """other's rows were copied in: its cache's memory goes back to the backend for the next request's."""
        self.backend.release(other.state)
        other.state = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep these rows (in this order), drop the others, and drop the columns all remaining rows pad."""
        rows = np.asarray(list(rows), dtype=np.int64)
        if len(rows) == self.rows and (rows == np.arange(self.rows)).all():
            return
        before, old_width = self.rows, self.width
        self.mask, self.lengths = self.mask[rows], self.lengths[rows]
        drop = int(old_width - self.lengths.max()) if len(rows) else old_width
        if self.capacity_rows:
            if self.state is not None:
                pool = self.backend.cache_arrays(self.state, self.capacity_rows, old_width)  # filled columns only
                moved = [(i, int(r)) for i, r in enumerate(rows) if i != r]
                if moved:  # ascending targets from rows in their old order: a row is never overwritten before it moves
                    for p in pool:
                        p[[i for i, _ in moved]] = p[[r for _, r in moved]]
                self.backend.set_rows(self.state, len(rows))
            if not len(rows) or 2 * drop > old_width:  # else lazily: padding costs a little attention, a move a step
                self._compact()
            return
        if len(rows):
            arrays = [np.ascontiguousarray(a[rows][:, :, drop:])
                      for a in self.backend.cache_arrays(self.state, before, old_width)]
            self._rotate(arrays, slice(0, len(rows)), 0, old_width - drop, -drop)
            self.state = self.backend.wrap_cache(arrays)
        else:
            self.state = None
        self.mask = self.mask[:, drop:]

    def row_cache(self, row: int) -> list[np.ndarray]:
        """One row's real columns as a batch-1 prefill without padding holds them, [1, heads, length, head_dim] per
        past input: what the prefix cache keeps of a prompt prefilled with others. Views of the cache where the row
        has no padding or nothing rotates at the cache index, else copies with the CPU target's keys re-rotated from
        their padded index (8 rows x 3 ms of copying delayed a whole wave's second token)."""
        length = int(self.lengths[row])
        pad = self.width - length
        views = [a[row : row + 1, :, pad:] for a in self.backend.cache_arrays(self.state, self.rows, self.width)]
        if pad == 0 or self.backend.kernel_rotary is None:
            return views
        arrays = [np.array(v) for v in views]
        self._rotate(arrays, slice(0, 1), 0, length, -pad)
        return arrays

    # ------------------------------------------------------------------------------------- helpers

    def _compact(self) -> None:
        """A pool drops the columns every row pads (keep leaves them while they are few): the rows move left."""
        drop = int(self.width - self.lengths.max()) if self.rows else self.width
        if drop and self.state is not None:
            pool = self.backend.cache_arrays(self.state, self.capacity_rows, self.width)
            self._shift(pool, self.rows, self.width, -drop)
        self.mask = self.mask[:, drop:]

    def _shift(self, pool: list[np.ndarray], n: int, width: int, by: int) -> None:
        """Move the first n rows' columns [0, width) by `by` along the cache axis (in place in the pool)."""
        if by == 0 or n == 0 or width == 0:
            return
        for p in pool:
            if by > 0:
                p[:n, :, by : by + width] = p[:n, :, :width].copy()
                p[:n, :, :by] = 0
            else:
                p[:n, :, : width + by] = p[:n, :, -by:width].copy()
        lo, hi = (by, by + width) if by > 0 else (0, width + by)
        self._rotate(pool, slice(0, n), lo, hi, by)

    def _rotate(self, arrays: list[np.ndarray], rows: slice, start: int, stop: int, by: int) -> None:
        table = self.backend.kernel_rotary
        if table is None or by == 0:
            return
        for keys in arrays[0::2]:  # past names alternate key, value per layer
            table.shift(keys[rows], start, stop, by)
