"""`neodeploy.runtime.load(artifact) -> Model`: generation on an exported artifact with numpy only.

Greedy and sampled decoding (temperature, top-k, top-p, repetition penalty; seeded), stop ids and stop
strings, batched prompts with left padding and real-token position ids, and UTF-8-safe streaming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from neodeploy.errors import ArtifactError, UsageError
from neodeploy.runtime.backend import Backend, create_backend
from neodeploy.runtime.manifest import read_manifest, verify_files
from neodeploy.runtime.tokenizer import TOKENIZER_FILES, Tokenizer

Prompt = str | Sequence[int]


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "length" | "eos" | "stop"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions count only real tokens, so a left-padded row sees exactly the positions it would alone."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [batch, longest] int64, each row right-aligned after pad_id / mask 0."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def sampling_distribution(logits: np.ndarray, history: list[list[int]], params: SamplingParams) -> np.ndarray:
    """Probabilities [batch, vocab] after repetition penalty, temperature, top-k and top-p (temperature > 0)."""
    logits = penalised(logits, history, params.repetition_penalty) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = np.partition(logits, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def penalised(logits: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    """transformers' repetition penalty: seen tokens' positive logits divided by it, negative ones multiplied."""
    logits = logits.astype(np.float64, copy=True)
    if penalty != 1.0:
        for row, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            values = logits[row, ids]
            logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def next_tokens(logits: np.ndarray, history: list[list[int]], params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits [batch, vocab]; temperature 0 is greedy."""
    if params.temperature == 0:
        return penalised(logits, history, params.repetition_penalty).argmax(-1)
    probs = sampling_distribution(logits, history, params)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


class Model:
    """A loaded artifact: tokenizer + backend. Thread-safe: calls share nothing mutable but the session."""

    def __init__(self, artifact: Path, manifest: dict, backend: Backend, tokenizer: Tokenizer | None):
        self.artifact, self.manifest, self.backend, self.tokenizer = artifact, manifest, backend, tokenizer
        spec = manifest["spec"]
        self.vocab_size: int = spec["vocab_size"]
        self.max_context: int = manifest["max_context"]
        special = manifest.get("tokenizer") or {}
        self.eos_token_id = tokenizer.eos_token_id if tokenizer else special.get("eos_token_id", spec.get("eos_token_id"))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer else special.get("pad_token_id")
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0

    # ------------------------------------------------------------------------------------------- inputs

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError(f"{self.artifact} has no tokenizer; pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError) as exc:
                raise UsageError("a prompt must be a string or a list of integer token ids") from exc
        if not ids:
            raise UsageError("a prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer else ""

    def _prepare(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams) -> list[list[int]]:
        params.check()
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not prompts:
            raise UsageError("no prompts given")
        encoded = [self.encode(p) for p in prompts]
        longest = max(len(ids) for ids in encoded)
        # An engine's profile can be narrower than the artifact: check before any token is produced.
        for limit, value, what in ((getattr(self.backend, "max_batch", None), len(encoded), "batch"),
                                   (getattr(self.backend, "max_prompt", None), longest, "prompt")):
            if limit is not None and value > limit:
                raise UsageError(f"{what} of {value} exceeds the engine's profile (max {limit}); rebuild with a larger profile")
        max_context = min(self.max_context, getattr(self.backend, "max_context", None) or self.max_context)
        if longest + params.max_new_tokens > max_context:
            raise UsageError(
                f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the artifact's "
                f"context of {max_context} tokens; shorten the prompt or ask for fewer tokens"
            )
        return encoded

    # ------------------------------------------------------------------------------------------- generation

    def _steps(self, encoded: list[list[int]], params: SamplingParams) -> Iterator[np.ndarray]:
        """Yield the batch's next tokens step by step (left-padded prefill, then cached decode)."""
        ids, mask = left_pad(encoded, self.pad_token_id)
        width = ids.shape[1]
        rng = np.random.default_rng(params.seed)
        history = [list(p) for p in encoded]
        # A backend with one set of device buffers (TensorRT) serves one generation at a time; callers close
        # this generator when they stop early, which releases the lock.
        lock = self.backend.lock if getattr(self.backend, "exclusive", False) else contextlib.nullcontext()
        with lock:
            logits, state = self.backend.prefill(ids, mask, position_ids(mask), capacity=width + params.max_new_tokens)
            for step in range(params.max_new_tokens):
                tokens = next_tokens(logits, history, params, rng)
                for row, token in enumerate(tokens):
                    history[row].append(int(token))
                yield tokens
                if step == params.max_new_tokens - 1:
                    return
                mask = np.concatenate([mask, np.ones((len(encoded), 1), np.int64)], axis=1)
                logits, state = self.backend.decode(tokens[:, None].astype(np.int64), mask, position_ids(mask)[:, -1:], state)

    def _stop_ids(self, stop: Sequence[str | int] | None) -> tuple[set[int], list[str]]:
        stop = [stop] if isinstance(stop, (str, int, np.integer)) else list(stop or [])
        ids = {int(s) for s in stop if not isinstance(s, str)}
        strings = [s for s in stop if isinstance(s, str) and s]
        if self.tokenizer is not None:
            # A stop string that is one special token never shows in the decoded text (specials are skipped):
            # stop on its id instead.
            special = {s: self.tokenizer.token_to_id(s) for s in strings}
            ids |= {i for i in special.values() if i is not None}
            strings = [s for s in strings if special[s] is None]
        if strings and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer; this artifact has none, pass stop token ids")
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids, strings

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Sequence[str | int] | None = None, seed: int | None = None) -> list[Generation]:
        """Generate for one prompt or a batch; always returns one Generation per prompt."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        encoded = self._prepare(prompts, params)
        stop_ids, stop_strings = self._stop_ids(stop)
        outputs: list[list[int]] = [[] for _ in encoded]
        reasons: list[str | None] = [None] * len(encoded)
        with contextlib.closing(self._steps(encoded, params)) as steps:
            for tokens in steps:
                for row, token in enumerate(tokens.tolist()):
                    if reasons[row] is not None:
                        continue
                    if token in stop_ids:
                        reasons[row] = "eos" if token == self.eos_token_id else "stop"
                        continue
                    outputs[row].append(token)
                    if stop_strings and any(s in self.decode(outputs[row]) for s in stop_strings):
                        reasons[row] = "stop"
                if all(r is not None for r in reasons):
                    break
        results = []
        for prompt, out, reason in zip(encoded, outputs, reasons):
            text = self.decode(out)
            if reason == "stop" and stop_strings:
                cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
                text = text[:cut] if cut >= 0 else text
            results.append(Generation(prompt, out, text, reason or "length"))
        return results

    def stream(self, prompt: Prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[str | int] | None = None,
               seed: int | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded. A piece never ends inside a UTF-8 character (byte-level
        tokens can split one), nor inside what may become a stop string."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        encoded = self._prepare(prompt, params)
        if len(encoded) != 1:
            raise UsageError("stream() takes one prompt; use generate() for batches")
        stop_ids, stop_strings = self._stop_ids(stop)
        out: list[int] = []
        sent = 0
        with contextlib.closing(self._steps(encoded, params)) as steps:
            for tokens in steps:
                token = int(tokens[0])
                if token in stop_ids:
                    break
                out.append(token)
                text = self.decode(out)
                cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    return
                safe = len(text)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far: wait for its other bytes
                    safe = len(text.rstrip("\ufffd"))
                # Hold back the longest tail that could still grow into any stop string.
                visible = text[:safe]
                hold = max((k for s in stop_strings for k in range(1, min(len(s) - 1, safe) + 1)
                            if visible.endswith(s[:k])), default=0)
                safe -= hold
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        text = self.decode(out)
        if len(text) > sent:
            yield text[sent:]


def load(artifact_dir: str | Path, backend: str | None = None, providers: list[str] | None = None,
         verify: bool = True) -> Model:
    """Load an artifact folder. Checks the manifest's format version and the sha256 of each file it reads."""
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    try:
        onnx_files = [manifest["onnx"]["file"], manifest["onnx"]["external_data"]]
        manifest["spec"], manifest["precision"], manifest["max_context"]  # noqa: B018 - presence check
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{artifact}/neodeploy.json lacks {exc}; re-export the artifact") from exc
    tokenizer_files = [n for n in TOKENIZER_FILES if n in manifest.get("files", {})]
    if verify:
        verify_files(artifact, manifest, onnx_files + tokenizer_files)
    tokenizer = Tokenizer.from_dir(artifact) if tokenizer_files else None
    return Model(artifact, manifest, create_backend(backend, artifact, manifest, providers), tokenizer)

