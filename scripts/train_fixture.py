"""Train a tiny GPT-NeoX or GPT-Neo with a real tokenizer on text that exists offline: the docstrings of
Python's standard library. A few minutes on a 2-core CPU give a loss well below uniform, so fp16,
quantisation and validate tolerances can be judged on peaked distributions, not on random weights whose
logits are near ties.

    python scripts/train_fixture.py gpt_neox ../shared/data/tokenizers/gpt-neox-20b OUT [--steps 200]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from neodeploy.reference import build_model, hf_config, preset
from neodeploy.runtime.tokenizer import TOKENIZER_FILES, Tokenizer

SEQ, BATCH, HELD_OUT = 128, 8, 16


def fixture_spec(family: str):
    if family == "gpt_neox":
        return preset("pythia-14m").replace(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                                            max_positions=512)
    # Window 32 < the training sequence: the local layer really is local.
    return preset("gpt-neo-125m").replace(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                                          max_positions=512, window_size=32)


def stdlib_docstrings(limit_chars: int = 3_000_000) -> str:
    """Module, class and function docstrings of the stdlib's own sources, in a fixed order (no imports)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
                    total += len(doc)
        if total > limit_chars:
            break
    return "\n\n".join(texts)


def token_stream(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    ids = []
    for chunk in text.split("\n\n"):
        ids.extend(tokenizer.encode(chunk + "\n\n"))
    return torch.tensor(ids, dtype=torch.long)


def train(family: str, tokenizer_dir: Path, out: Path, steps: int = 200, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    spec = fixture_spec(family)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    data = token_stream(tokenizer, stdlib_docstrings())
    held, train_data = data[: HELD_OUT * SEQ], data[HELD_OUT * SEQ :]
    model = build_model(spec)
    for name, p in model.named_parameters():
        if "norm" in name or ".ln_" in name:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        for group in optim.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_data) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([train_data[s : s + SEQ + 1] for s in starts])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {family} step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with torch.inference_mode():
        rows = held.view(HELD_OUT, SEQ)
        logits, _ = model(rows[:, :-1])
        held_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), rows[:, 1:].reshape(-1)).item()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (spec.tied_embeddings and k in ("lm_head.weight", "embed_out.weight"))}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    stats = {"family": family, "steps": steps, "train_tokens": int(len(train_data)), "held_out_loss": held_loss,
             "uniform_loss": math.log(spec.vocab_size), "seconds": round(time.perf_counter() - start, 1)}
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
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
