"""Train a target and a small draft of the same family on the same text (the stdlib's docstrings) with one tokenizer:
the pair speculative decoding's draft-model benchmark needs (random weights never agree).

    python scripts/train_pair.py ../shared/data/tokenizers/gpt-neox-20b OUT [--steps 150]
    python scripts/train_pair.py bytes OUT [--steps 400] [--seconds 700]

writes OUT/target and OUT/draft, checkpoints `neodeploy export` takes. With a tokenizer folder: a 4-layer, 256-wide
target and a 1-layer, 64-wide draft. Their 50k-row lm_head is most of both models' compute, so the draft costs ~1/4 of
the target and speculation gains nothing. With `bytes` (the built-in byte tokenizer, 257 ids, as the demo's model): a
6-layer, 512-wide target and a 1-layer, 128-wide draft, whose layers dominate: a draft step costs a small fraction of
a target step, as for a real pair (pythia-70m drafting for pythia-1.4b). Training runs on one thread (the other core
stays free); --seconds caps each model's training time (the learning-rate schedule ends on whichever comes first).
--distill trains the draft on the target's next-token distributions (train the target first, e.g. --only target):
the byte pair's drafts are then accepted 52 % of the time instead of 36 % (docs/benchmarks.md).

    python scripts/train_pair.py bytes OUT --steps 400 --seconds 690 --only target
    python scripts/train_pair.py bytes OUT --draft-steps 900 --seconds 450 --only draft --distill
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neodeploy.reference import preset
from neodeploy.reference.checkpoint import load_checkpoint
from neodeploy.reference import train as training
from neodeploy.core.tokenizer import Tokenizer, write_tokenizer_files

BYTES = "bytes"
# Small enough to train in minutes on 2 cores (a 6-layer, 512-wide target took > 13 s a step on a loaded machine).
SIZES = {"target": dict(num_layers=4, hidden_size=256, num_heads=8, intermediate_size=1024),
         "draft": dict(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=256)}
# Byte vocabulary, one thread: ~1.4 s a step for the target (400 steps: 9 minutes), ~0.04 s for the draft alone and
# ~0.46 s distilled (the target's forward pass each step).
BYTE_SIZES = {"target": dict(num_layers=6, hidden_size=512, num_heads=8, intermediate_size=2048),
              "draft": dict(num_layers=1, hidden_size=128, num_heads=4, intermediate_size=512)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", help="a tokenizer folder, or `bytes` for the built-in byte tokenizer")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--draft-steps", type=int, help="the draft's steps, when not --steps (it is far cheaper)")
    parser.add_argument("--seconds", type=float, help="at most this long per model")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--only", choices=sorted(SIZES), help="train one of the two")
    parser.add_argument("--distill", action="store_true",
                        help="train the draft on the target's next-token distributions (OUT/target must exist)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tokenizer == BYTES:
        base, sizes, source = training.byte_model_spec(), BYTE_SIZES, None
    else:
        base, sizes, source = preset("pythia-14m"), SIZES, Path(args.tokenizer)
    text = training.stdlib_docstrings()
    for name, size in sizes.items():
        if args.only and name != args.only:
            continue
        spec = base.replace(max_positions=1024, **size)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        write_tokenizer_files(out, spec, source)  # the same files for both: a draft must share the target's tokenizer
        data = training.token_stream(Tokenizer.from_dir(out).encode, text)
        steps = args.draft_steps if name == "draft" and args.draft_steps else args.steps
        teacher = load_checkpoint(args.out / "target").eval() if name == "draft" and args.distill else None
        model, stats = training.train(spec, data, steps, seed=0, seconds=args.seconds, lr=args.lr,
                                      echo=lambda line: print(f" {name}{line}", flush=True), teacher=teacher)
        if teacher is not None:
            stats["distilled_from"] = str(args.out / "target")
        training.save(model, spec, out, stats)
        print(json.dumps({"model": name, "parameters": spec.num_parameters(), **size, **stats}), flush=True)


if __name__ == "__main__":
    main()
