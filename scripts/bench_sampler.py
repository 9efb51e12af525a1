"""Per-token cost of the runtime's sampler on a vocabulary-sized row, for the usual chat settings.

    python scripts/bench_sampler.py [--vocab 50304] [--tokens 200]

Run on two commits to compare them: it only imports neodeploy.runtime.sampling.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from neodeploy.runtime.sampling import Sampler, SamplingParams

SETTINGS = [
    ("greedy", {}),
    ("temperature 1 (OpenAI's default)", {"temperature": 1.0}),
    ("temperature 0.8, top_p 0.95", {"temperature": 0.8, "top_p": 0.95}),
    ("temperature 0.7, top_k 40", {"temperature": 0.7, "top_k": 40}),
    ("temperature 0.7, top_p 0.9, repetition_penalty 1.1", {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}),
    ("greedy with logprobs 5", {"logprobs": 5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Logits shaped like a language model's: a few likely tokens over a long tail.
    rows = (rng.standard_normal((16, args.vocab)) * 2.5).astype(np.float32)
    rows[:, rng.integers(0, args.vocab, 20)] += 8.0
    # A nearly flat row (a random-weight model's, or a high temperature): top-p then keeps most of the vocabulary.
    flat = (rng.standard_normal((16, args.vocab)) * 0.3).astype(np.float32)
    print(f"vocabulary {args.vocab}, {args.tokens} tokens per setting, median of 5 runs")
    for name, options, logits in [*((n, o, rows) for n, o in SETTINGS),
                                  ("temperature 0.8, top_p 0.95, on a nearly flat row", SETTINGS[2][1], flat)]:
        runs = []
        for _ in range(5):
            sampler = Sampler(SamplingParams(seed=0, **options), list(range(64)))
            start = time.perf_counter()
            for i in range(args.tokens):
                sampler(logits[i % len(logits)])
            runs.append((time.perf_counter() - start) / args.tokens * 1e3)
        print(f"  {name:52s} {statistics.median(runs):7.3f} ms/token")


if __name__ == "__main__":
    main()
