"""Speculative decoding at batch 1: decode tokens/s with and without it, alternating, on the same prompts (greedy).

    python scripts/bench_speculate.py ARTIFACT --speculate ngram --workload code
    python scripts/bench_speculate.py TARGET --speculate DRAFT_ARTIFACT --workload docs

Both runs go through the engine with one slot (what a server does for a request alone). Decode tokens/s counts the
tokens after the first over the time after the first (prefill excluded). Prints per round, the median ratio, the
acceptance rate, and whether every output was identical (it must be: speculation is exact).

Workloads: code (a stdlib function's source, then a request to repeat it: output that quotes its input), docs (the
start of a stdlib docstring: free text), noise (random ids repeated: prompt lookup finds matches a random or weakly
trained model does not follow, so drafts are mostly refused: the cost side).
"""

from __future__ import annotations

import argparse
import inspect
import statistics

import numpy as np

from neodeploy.runtime import load
from neodeploy.runtime.engine import Engine, EngineConfig


def code_prompts(count: int, vocab: int) -> list[str]:
    import json
    import textwrap

    functions = [json.dumps, textwrap.wrap, inspect.getdoc, statistics.median, textwrap.dedent, json.loads]
    prompts = []
    for function in functions[:count]:
        source = inspect.getsource(function)[:1200]
        prompts.append(f"{source}\n\n# The same function, unchanged:\n{source.splitlines()[0]}\n")
    return prompts


def doc_prompts(count: int, vocab: int) -> list[str]:
    import collections
    import json
    import pathlib
    import shutil

    modules = [json, pathlib, shutil, collections, inspect, statistics]
    return [(m.__doc__ or m.__name__)[:400] for m in modules[:count]]


def noise_prompts(count: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)  # ids a byte-level vocabulary (257) has too
    return [rng.integers(min(100, vocab // 2), min(20000, vocab), 24).tolist() * 4 for _ in range(count)]


WORKLOADS = {"code": code_prompts, "docs": doc_prompts, "noise": noise_prompts}


def decode_rate(engine: Engine, prompts, new: int) -> tuple[float, list[list[int]]]:
    tokens, seconds, outputs = 0, 0.0, []
    for prompt in prompts:
        handle = engine.submit(prompt, max_new_tokens=new)
        result = handle.result()
        outputs.append(result.output_ids)
        if handle.last_token_at and handle.first_token_at and len(result.output_ids) > 1:
            tokens += len(result.output_ids) - 1
            seconds += handle.last_token_at - handle.first_token_at
    return tokens / seconds if seconds else 0.0, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--speculate", required=True, help="ngram or a draft artifact's folder")
    parser.add_argument("--speculate-tokens", type=int, default=4)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="code")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new", type=int, default=96, help="tokens generated per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = load(args.artifact)
    prompts = WORKLOADS[args.workload](args.prompts, model.vocab_size)
    plain = Engine(model, EngineConfig(max_running=1, prefix_cache=0))
    fast = Engine(model, EngineConfig(max_running=1, prefix_cache=0, speculate=args.speculate,
                                      speculate_tokens=args.speculate_tokens))
    print(f"{args.artifact}: {model.manifest.spec.num_layers} layers, hidden {model.manifest.spec.hidden_size}, "
          f"{model.manifest.onnx.target} target; speculate {args.speculate} k={args.speculate_tokens}; workload "
          f"{args.workload}, {len(prompts)} prompts x {args.new} tokens, greedy")
    decode_rate(plain, prompts[:1], 8)  # warm both sessions
    decode_rate(fast, prompts[:1], 8)
    ratios, identical = [], True
    print(f"{'round':>5} {'plain tok/s':>12} {'speculative tok/s':>18} {'ratio':>7}")
    for round_ in range(args.rounds):
        order = [(plain, "plain"), (fast, "fast")] if round_ % 2 == 0 else [(fast, "fast"), (plain, "plain")]
        rates, outputs = {}, {}
        for engine, name in order:
            rates[name], outputs[name] = decode_rate(engine, prompts, args.new)
        identical &= outputs["plain"] == outputs["fast"]
        ratios.append(rates["fast"] / rates["plain"])
        print(f"{round_:>5} {rates['plain']:>12.1f} {rates['fast']:>18.1f} {ratios[-1]:>7.2f}")
    stats = fast.speculator.stats
    print(f"median ratio {statistics.median(ratios):.2f}x; acceptance {stats.accepted}/{stats.drafted} drafted tokens "
          f"({stats.rate:.0%}); outputs identical: {identical}")
    plain.close()
    fast.close()


if __name__ == "__main__":
    main()
