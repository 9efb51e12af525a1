"""The automatic prefix cache: the KV of prompts the engine already prefilled, reused by later prompts that start
with the same tokens (a system prompt, few-shot examples, a growing conversation).

Blocks of BLOCK tokens are keyed by (the parent block's id, the block's tokens), as vLLM chains its block hashes:
a block is only ever reached through the exact tokens before it, so a hit is an exact match of the whole prefix
(the dict compares the token tuples; no hash collision can alias two prefixes). Each block holds the keys and
values of its tokens for every layer, copied out of the prefill that computed them, within a byte budget;
the least recently used block goes first (a block whose parent went is unreachable and ages out the same way).

A prompt's reuse stops one token short of its end (the last position's logits must be computed) and at a block
boundary. The cached keys and values are those a batch-1 prefill without padding computed at the same positions,
which is what the engine's own prefill of the new prompt would compute there (rotary inside the CPU target's kernel
included: cache index = position in an unpadded row), so the rest of the prompt continues from them exactly as a
chunked prefill continues from its earlier chunks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

BLOCK = 16  # tokens per block (vLLM's default)


@dataclass
class _Block:
    id: int
    kv: np.ndarray  # [2 x layers, heads, BLOCK, head_dim]: past_key_values.{i}.key / value in order


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget, self.block = budget_bytes, block
        self._blocks: collections.OrderedDict[tuple[int, tuple[int, ...]], _Block] = collections.OrderedDict()
        self._next_id = 1
        self.bytes = 0
        self.query_tokens = self.hit_tokens = 0

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

    def lookup(self, prompt: list[int]) -> tuple[int, list[np.ndarray]] | None:
        """(tokens reused, the past arrays [1, heads, tokens, head_dim] per past input) for the longest cached
        prefix of prompt that leaves at least one token to run; None on a miss. Counts the query."""
        self.query_tokens += len(prompt)
        chain = self._chain(prompt)
        keys, found = [key for key, _ in chain], [block.kv for _, block in chain]
        self._touch(keys)
        if not found:
            return None
        kv = np.concatenate(found, axis=2)  # [2L, heads, tokens, head_dim]
        self.hit_tokens += kv.shape[2]
        return kv.shape[2], [a[None] for a in kv]

    def store(self, prompt: list[int], arrays: list[np.ndarray]) -> None:
        """Keep the whole blocks of a prefilled prompt; arrays: its past [1, heads, >= len(prompt), head_dim]."""
        keys, parent, b = [], 0, self.block
        for start in range(0, len(prompt) - len(prompt) % b, b):
            key = (parent, tuple(prompt[start:start + b]))
            block = self._blocks.get(key)
            if block is None:
                kv = np.stack([a[0, :, start:start + b] for a in arrays])
                if kv.nbytes > self.budget:
                    break
                self._touch(keys)  # this prompt's earlier blocks are not the ones to make room
                while self.bytes + kv.nbytes > self.budget:
                    _, old = self._blocks.popitem(last=False)
                    self.bytes -= old.kv.nbytes
                block = self._blocks[key] = _Block(self._next_id, kv)
                self._next_id += 1
                self.bytes += kv.nbytes
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
        self.bytes = 0
