"""The reference stage's results, reused across exports of the same checkpoint (fp32, fp16, cpu, int8 …).

Keyed by the sha256 of every file in the checkpoint folder, the golden cases' ids and masks, the decode steps and
the torch and neodeploy versions: a changed weight, config, tokenizer or case definition is a new key. Stored as
plain .npz arrays (never pickles) under $NEODEPLOY_CACHE/reference (default ~/.cache/neodeploy), written atomically,
the oldest entries dropped beyond MAX_ENTRIES. A read that fails for any reason is a miss.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from neodeploy.core.files import sha256

MAX_ENTRIES = 8


def cache_dir() -> Path:
    return Path(os.environ.get("NEODEPLOY_CACHE", Path.home() / ".cache" / "neodeploy")) / "reference"


def key(checkpoint: Path, cases, steps: int) -> str:
    import torch

    from neodeploy import __version__

    h = hashlib.sha256(f"neodeploy {__version__} torch {torch.__version__} steps {steps}\n".encode())
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        h.update(f"{path.name} {sha256(path)}\n".encode())
    for case in cases:
        h.update(case.name.encode() + case.input_ids.tobytes() + case.attention_mask.tobytes())
    return h.hexdigest()[:32]


def load(digest: str, cases) -> bool:
    """Fill the cases from the cache; False (cases untouched) on a miss."""
    path = cache_dir() / f"{digest}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            filled = {c.name: (data[f"{c.name}/tokens"], data[f"{c.name}/prefill_logits"], data[f"{c.name}/step_logits"])
                      for c in cases}
    except (OSError, KeyError, ValueError):
        return False
    for case in cases:
        case.tokens, case.prefill_logits, case.step_logits = filled[case.name]
    os.utime(path)  # most recently used
    return True


def save(digest: str, cases) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for c in cases:
            arrays.update({f"{c.name}/tokens": c.tokens, f"{c.name}/prefill_logits": c.prefill_logits,
                           f"{c.name}/step_logits": c.step_logits})
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}.", suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / f"{digest}.npz")
        entries = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written costs time, never the export
