"""Train a target and a small draft of the same family on the same text (the stdlib's docstrings) with one tokenizer:
the pair speculative decoding's draft-model benchmark needs (random weights never agree).

    python scripts/train_pair.py ../shared/data/tokenizers/gpt-neox-20b OUT [--steps 150]

writes OUT/target (4 layers, hidden 256) and OUT/draft (1 layer, hidden 64), checkpoints `neodeploy export` takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neodeploy.reference import preset
from neodeploy.reference import train as training
from neodeploy.core.tokenizer import TOKENIZER_FILES, Tokenizer

# Small enough to train in minutes on 2 cores (a 6-layer, 512-wide target took > 13 s a step on a loaded machine).
SIZES = {"target": dict(num_layers=4, hidden_size=256, num_heads=8, intermediate_size=1024),
         "draft": dict(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--only", choices=sorted(SIZES), help="train one of the two")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(args.tokenizer_dir)
    data = training.token_stream(tokenizer.encode, training.stdlib_docstrings())
    for name, size in SIZES.items():
        if args.only and name != args.only:
            continue
        spec = preset("pythia-14m").replace(max_positions=1024, **size)
        model, stats = training.train(spec, data, args.steps, seed=0, echo=lambda line: print(f" {name}{line}", flush=True))
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        training.save(model, spec, out, stats)
        for file in TOKENIZER_FILES:
            if (args.tokenizer_dir / file).is_file():
                (out / file).write_bytes((args.tokenizer_dir / file).read_bytes())
        print(json.dumps(stats))


if __name__ == "__main__":
    main()
