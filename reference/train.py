"""Tiny models trained on text every machine has offline: the docstrings of Python's standard library.

Used by the demo (a byte-level model trained in seconds, so the main job shows words, not noise) and by the
test fixtures (scripts/train_fixture.py: real tokenizers, peaked distributions for fp16 / quantisation gates).
"""

from __future__ import annotations

import ast
import json
import math
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neodeploy.core.spec import ModelSpec

SEQ, BATCH, HELD_OUT = 128, 8, 16


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


def token_stream(encode: Callable[[str], list[int]], text: str) -> torch.Tensor:
    ids = []
    for chunk in text.split("\n\n"):
        ids.extend(encode(chunk + "\n\n"))
    return torch.tensor(ids, dtype=torch.long)


def train(spec: ModelSpec, data: torch.Tensor, steps: int, seed: int = 0, seconds: float | None = None,
          lr: float = 3e-3, echo: Callable[[str], None] = print,
          teacher: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """AdamW with warm-up and cosine decay on random windows of `data`; stops after `steps` or `seconds`.
    With a `teacher` (a model of the same vocabulary), the targets are its next-token distributions instead of the
    data's next tokens (distillation: a speculative draft learns to agree with its target, not only with the text).
    Returns the model (eval mode) and stats with the held-out loss (on the data)."""
    from neodeploy.reference import build_model

    torch.manual_seed(seed)
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
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    done = 0
    for step in range(steps):
        progress = step / steps if seconds is None else max(step / steps, (time.perf_counter() - start) / seconds)
        if progress >= 1:
            break
        rate = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2)
        for group in optim.param_groups:
            group["lr"] = rate
        starts = torch.randint(0, len(train_data) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([train_data[s : s + SEQ + 1] for s in starts])
        logits, _ = model(batch[:, :-1])
        if teacher is None:
            labels = batch[:, 1:].reshape(-1)
        else:
            with torch.inference_mode():
                labels = torch.softmax(teacher(batch[:, :-1])[0].reshape(-1, spec.vocab_size).float(), dim=-1)
            labels = labels.clone()  # an inference tensor cannot be saved for backward
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        done = step + 1
        if step % 50 == 0:
            echo(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    with torch.inference_mode():
        rows = held.view(HELD_OUT, SEQ)
        logits, _ = model(rows[:, :-1])
        held_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), rows[:, 1:].reshape(-1)).item()
    stats = {"family": spec.family, "steps": done, "train_tokens": int(len(train_data)), "held_out_loss": held_loss,
             "uniform_loss": math.log(spec.vocab_size), "seconds": round(time.perf_counter() - start, 1)}
    return model, stats


def save(model: torch.nn.Module, spec: ModelSpec, out: Path, stats: dict) -> None:
    """Weights (safetensors), config.json and training.json into an existing folder."""
    from safetensors.torch import save_file

    from neodeploy.reference import hf_config

    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (spec.tied_embeddings and k in ("lm_head.weight", "embed_out.weight"))}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")


def byte_model_spec() -> ModelSpec:
    """The demo's model: pythia-14m's architecture, 2 layers, one token per byte (+ <|endoftext|> at 0)."""
    from neodeploy.core.spec import preset

    return preset("pythia-14m").replace(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                                        vocab_size=257, max_positions=512, eos_token_id=0, bos_token_id=0)
