"""How close quantised models stay to the fp32 reference: our artifacts and llama.cpp GGUFs side by side.

    python scripts/quant_accuracy.py CHECKPOINT SYSTEM [SYSTEM ...] [--prompts docs/validate-prompts.txt] [--steps 48]

A SYSTEM is an artifact folder exported from CHECKPOINT or a GGUF converted from it (needs llama-cpp-python, see
the README's speed section). For every prompt the reference greedily generates --steps tokens; each system is then
teacher-forced on that same text and judged at every step by top-1 agreement with the reference and the KL
divergence KL(reference || system) of the next-token distributions; plus the perplexity ratio on validate's
perplexity text. The same numbers for every system, so int4 and q4_0 compare on one footing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    from neodeploy.validate import _log_softmax, _perplexity

    targets = np.array(ids[1:])
    return _perplexity(np.take_along_axis(_log_softmax(logits[:-1]), targets[:, None], -1)[:, 0])


def runner(system: str, threads: int):
    """(teacher-forced logits for tokens after ids, logits at every position of ids) for one system."""
    if system.endswith(".gguf"):
        from llama_cpp import Llama

        llm = Llama(system, logits_all=True, n_ctx=512, n_threads=threads, verbose=False)

        def forced(ids, tokens):
            llm.reset()
            llm.eval(ids + tokens[:-1])
            return np.array(llm.scores[len(ids) - 1: len(ids) - 1 + len(tokens)])

        def every(ids):
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)])

        return forced, every
    from neodeploy.runtime import load
    from neodeploy.validate import _runtime_step_logits

    model = load(system, threads=threads)
    return (lambda ids, tokens: _runtime_step_logits(model, ids, tokens),
            lambda ids: _runtime_step_logits(model, ids[:1], ids[1:] + [0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("systems", nargs="+")
    parser.add_argument("--prompts", default=str(Path(__file__).parent.parent / "docs" / "validate-prompts.txt"))
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from neodeploy.reference.checkpoint import load_checkpoint
    from neodeploy.reference.generate import greedy_generate
    from neodeploy.core.tokenizer import Tokenizer
    from neodeploy.validate import PERPLEXITY_TEXT, _log_softmax

    reference, tokenizer = load_checkpoint(args.checkpoint), Tokenizer.from_dir(args.checkpoint)
    cases = []
    for prompt in (line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()):
        ids = tokenizer.encode(prompt)
        result = greedy_generate(reference, ids, args.steps, keep_logits=True)
        cases.append((ids, list(result.output_ids), np.stack(result.step_logits)))
    text = tokenizer.encode(PERPLEXITY_TEXT)
    while len(text) < 128:
        text += tokenizer.encode(" " + PERPLEXITY_TEXT)
    text = text[:256]
    with torch.inference_mode():
        reference_ppl = perplexity(reference(torch.from_numpy(np.array([text])))[0][0].numpy(), text)
    print(f"{len(cases)} prompts x {args.steps} steps, teacher-forced on the reference's greedy text")
    print(f"{'system':44s} {'top-1':>7s} {'mean KL':>9s} {'ppl ratio':>10s}")
    for system in args.systems:
        forced, every = runner(system, args.threads)
        top1, kl = [], []
        for ids, tokens, ref_logits in cases:
            logits = forced(ids, tokens)
            top1 += list(logits.argmax(-1) == ref_logits.argmax(-1))
            ref, ours = _log_softmax(ref_logits), _log_softmax(logits)
            kl += list((np.exp(ref) * (ref - ours)).sum(-1))
        ratio = perplexity(every(text), text) / reference_ppl
        print(f"{system:44s} {np.mean(top1):7.1%} {np.mean(kl):9.4f} {ratio:10.4f}", flush=True)


if __name__ == "__main__":
    main()
