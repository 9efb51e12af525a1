"""Train a tiny GPT-NeoX or GPT-Neo with a real tokenizer on text that exists offline: the docstrings of
Python's standard library. A few minutes on a 2-core CPU give a loss well below uniform, so fp16,
quantisation and validate tolerances can be judged on peaked distributions, not on random weights whose
logits are near ties.

    python scripts/train_fixture.py gpt_neox ../shared/data/tokenizers/gpt-neox-20b OUT [--steps 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neodeploy.reference import preset
from neodeploy.reference import train as training
from neodeploy.core.tokenizer import TOKENIZER_FILES, Tokenizer


def fixture_spec(family: str):
    if family == "gpt_neox":
        return preset("pythia-14m").replace(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                                            max_positions=512)
    # Window 32 < the training sequence: the local layer really is local.
    return preset("gpt-neo-125m").replace(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                                          max_positions=512, window_size=32)


def train(family: str, tokenizer_dir: Path, out: Path, steps: int = 200, seed: int = 0) -> dict:
    spec = fixture_spec(family)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    data = training.token_stream(tokenizer.encode, training.stdlib_docstrings())
    model, stats = training.train(spec, data, steps, seed, echo=lambda line: print(f" {family}{line}", flush=True))
    out.mkdir(parents=True, exist_ok=True)
    training.save(model, spec, out, stats)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return stats


def _keep_large_blocks() -> None:
    """Each step allocates and frees ~200 MB of vocabulary-sized logits; glibc would mmap and unmap them
    every time (a third of the run in page faults). Keep such blocks in the heap instead."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: slower, same result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=["gpt_neox", "gpt_neo"])
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _keep_large_blocks()
    print(json.dumps(train(args.family, args.tokenizer_dir, args.out, args.steps, args.seed), indent=2))


if __name__ == "__main__":
    main()
