"""The automatic prefix cache: the KV of prompts the engine already prefilled, reused by later prompts that start
with the same tokens (a system prompt, few-shot examples, a growing conversation).

Blocks of BLOCK tokens are keyed by (the parent block's id, the block's tokens), as vLLM chains its block hashes:
a block is only ever reached through the exact tokens before it, so a hit is an exact match of the whole prefix
(the dict compares the token tuples; no hash collision can alias two prefixes). Each block holds the keys and
values of its tokens for every layer, copied out of the prefill that computed them, within a byte budget;
the least recently used block goes first (a block whose parent went is unreachable and ages out the same way).

The blocks live in one pool allocated once ([2 x layers, heads, slots, BLOCK, head_dim]: a prompt's blocks go
into consecutive free slots, so a hit comes out of each past input as one slice per head); an evicted block's slot
is reused. Allocating each block anew grew the process's memory block by block while serving, and on a virtual
machine a page touched for the first time can cost milliseconds: storing one 128-token prompt of pythia-160m took
65 ms that way (4 ms into touched memory). `warm()` touches the whole pool up front (the server does it before it
reports ready).

A prompt's reuse stops one token short of its end (the last position's logits must be computed) and at a block
boundary. The cached keys and values are those a batch-1 prefill without padding computed at the same positions,
which is what the engine's own prefill of the new prompt would compute there (rotary inside the CPU target's kernel
included: cache index = position in an unpadded row), so the rest of the prompt continues from them exactly as a
chunked prefill continues from its earlier chunks.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import numpy as np

BLOCK = 16  # tokens per block (vLLM's default)


class Hit:
    """Cached prefixes of one length, one per row, as a batch's past: written straight from the pool into a cache's
    rows (an in-place graph's cache: one copy, no array in between) or copied out as arrays [rows, heads, tokens,
    head_dim] (a graph that takes its past as inputs). Valid until the cache next stores (a slot may be reused)."""

    def __init__(self, pool: np.ndarray, rows: list[list[int]], block: int):
        self._pool, self._rows, self.block = pool, rows, block
        self.tokens = len(rows[0]) * block

    @property
    def rows(self) -> int:
        return len(self._rows)

    @staticmethod
    def stack(hits: list[Hit]) -> Hit:
        """Several requests' hits as the rows of one past (they reuse the same number of tokens)."""
        if any(hit.tokens != hits[0].tokens for hit in hits):
            raise ValueError("stacked hits must reuse the same number of tokens")
        return Hit(hits[0]._pool, [row for hit in hits for row in hit._rows], hits[0].block)

    def write_into(self, views: list[np.ndarray]) -> None:
        """views: per past input, a cache's [rows, heads, >= tokens, head_dim] (its first rows)."""
        b = self.block
        runs = [_runs(slots) for slots in self._rows]
        for i, view in enumerate(views):
            for r, row_runs in enumerate(runs):
                for first, slot, count in row_runs:
                    # consecutive slots are one stretch of each head's memory: one slice copy per stretch (a
                    # prompt's blocks are stored in consecutive free slots until evictions scatter them). Twice
                    # as fast as np.take's gather into the same rows, and no slower with every slot apart.
                    stretch = self._pool[i, :, slot:slot + count]
                    view[r, :, first * b:(first + count) * b] = stretch.reshape(stretch.shape[0], count * b, -1)

    def arrays(self) -> list[np.ndarray]:
        """Copied out: per past input, [rows, heads, tokens, head_dim]."""
        inputs, heads, _, _, head_dim = self._pool.shape
        out = [np.empty((self.rows, heads, self.tokens, head_dim), self._pool.dtype) for _ in range(inputs)]
        self.write_into(out)
        return out


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first block, first slot, count) of each stretch of blocks held in consecutive slots (within a stretch, slot
    minus block is constant)."""
    runs = []
    for _, stretch in itertools.groupby(enumerate(slots), key=lambda pair: pair[1] - pair[0]):
        stretch = list(stretch)
        runs.append((stretch[0][0], stretch[0][1], len(stretch)))
    return runs


@dataclass
class _Block:
    id: int
    slot: int  # its index in the pool's slots axis


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK, layout: tuple[int, int, int] | None = None,
                 dtype=np.float32):
        """layout: (past inputs = 2 x layers, heads, head_dim) of the model, so the pool can be made (and warmed)
        before the first store; without it the first stored prompt's arrays give it."""
        self.budget, self.block, self.dtype = budget_bytes, block, np.dtype(dtype)
        self._layout = layout
        self._blocks: collections.OrderedDict[tuple[int, tuple[int, ...]], _Block] = collections.OrderedDict()
        self._pool: np.ndarray | None = None
        self._free: list[int] = []
        self._next_id = 1
        self.query_tokens = self.hit_tokens = 0

    @property
    def bytes(self) -> int:
        """Bytes of KV held (the pool's slots in use)."""
        return len(self._blocks) * self.block_bytes if self._layout is not None else 0

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's keys and values over every layer (known once the layout is)."""
        inputs, heads, head_dim = self._layout
        return inputs * heads * self.block * head_dim * self.dtype.itemsize

    @property
    def slots(self) -> int:
        """Blocks the budget holds (known once the layout is)."""
        return self.budget // self.block_bytes

    def _ensure_pool(self) -> np.ndarray:
        if self._pool is None:
            slots = self.slots
            self._pool = np.empty((self._layout[0], self._layout[1], slots, self.block, self._layout[2]), self.dtype)
            self._free = list(range(slots - 1, -1, -1))
        return self._pool

    def warm(self) -> None:
        """Touch the whole pool now, so that storing prefixes later never waits for fresh memory pages."""
        if self._layout is not None:
            self._ensure_pool().fill(0)

    def _chain(self, prompt: list[int]) -> list[tuple[tuple, _Block]]:
        """The cached blocks that start prompt, in order, as (key, block): whole blocks only, and at least one
        token of prompt left after them (its last position's logits must be computed)."""
        chain, parent, b = [], 0, self.block
        usable = len(prompt) - 1
        for start in range(0, usable - usable % b, b):
            key = (parent, tuple(prompt[start:start + b]))
            block = self._blocks.get(key)
            if block is None:
                break
            chain.append((key, block))
            parent = block.id
        return chain

    def match(self, prompt: list[int]) -> int:
        """Tokens of prompt that lookup would reuse now; copies nothing, counts nothing, marks nothing used (the
        scheduler asks this of every waiting request; holding their copies at once cost fresh pages, 100-200 ms)."""
        return len(self._chain(prompt)) * self.block

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest cached prefix of prompt that leaves at least one token to run (Hit.tokens long); None on a
        miss. Counts the query."""
        self.query_tokens += len(prompt)
        chain = self._chain(prompt)
        self._touch([key for key, _ in chain])
        if not chain:
            return None
        hit = Hit(self._pool, [[block.slot for _, block in chain]], self.block)
        self.hit_tokens += hit.tokens
        return hit

    def store(self, prompt: list[int], arrays: list[np.ndarray]) -> None:
        """Keep the whole blocks of a prefilled prompt; arrays: its past [1, heads, >= len(prompt), head_dim]."""
        if self._layout is None:
            self._layout = (len(arrays), arrays[0].shape[1], arrays[0].shape[3])
            self.dtype = arrays[0].dtype
        pool = self._ensure_pool()
        if not pool.shape[2]:
            return  # the budget holds no block
        keys, parent, b = [], 0, self.block
        for start in range(0, len(prompt) - len(prompt) % b, b):
            key = (parent, tuple(prompt[start:start + b]))
            block = self._blocks.get(key)
            if block is None:
                self._touch(keys)  # this prompt's earlier blocks are not the ones to make room
                if not self._free:
                    _, old = self._blocks.popitem(last=False)
                    self._free.append(old.slot)
                slot = self._free.pop()
                for i, a in enumerate(arrays):
                    pool[i, :, slot] = a[0, :, start:start + b]
                block = self._blocks[key] = _Block(self._next_id, slot)
                self._next_id += 1
            keys.append(key)
            parent = block.id
        self._touch(keys)

    def _touch(self, keys: list) -> None:
        """Mark a chain used, its leaf first and its root last: eviction then takes leaves before the roots that
        lead to them (evicting a root first would strand its whole chain in memory, unreachable)."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def clear(self) -> None:
        self._blocks.clear()
        self._free = list(range(self._pool.shape[2] - 1, -1, -1)) if self._pool is not None else []
