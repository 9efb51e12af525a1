"""`neodeploy.runtime.load(artifact) -> Model`: generation on an exported artifact with numpy only.

Greedy and sampled decoding (temperature, top-k, top-p, repetition penalty; seeded per sequence), stop ids
and stop strings, batched prompts with left padding and real-token position ids, and UTF-8-safe streaming.
The pieces are shared with the engine (runtime/engine.py): DecodeBatch (batch.py), Sampler (sampling.py),
TextStream (text.py), Sequence (sequence.py).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.runtime.backend import Backend, create_backend
from neodeploy.runtime.grammar import Grammars
from neodeploy.runtime.batch import DecodeBatch, left_pad, position_ids  # noqa: F401 - re-exported
from neodeploy.core.manifest import Manifest, artifact_path, read_manifest, verify_files
from neodeploy.runtime.sampling import SamplingParams, penalised, sampling_distribution  # noqa: F401 - re-exported
from neodeploy.runtime.sequence import Delta, Generation, Sequence
from neodeploy.runtime.speculate import (NGRAM, ModelDrafter, NgramDrafter, Speculator, check_tokens, check_verifies,
                                         shared_vocabulary)
from neodeploy.runtime.text import stop_sets
from neodeploy.core.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, Tokenizer

Prompt = str | Seq[int]


class Stream:
    """Text pieces of one generation as they are decoded; `finish_reason` and `generation` once it is exhausted."""

    def __init__(self, deltas: Iterator[Delta], sequence: Sequence):
        self._deltas, self.sequence = deltas, sequence

    def __iter__(self) -> Iterator[str]:
        for delta in self._deltas:
            if delta.text:
                yield delta.text

    def deltas(self) -> Iterator[Delta]:
        """Per token (text pieces may merge several tokens or hold one back): what benchmarks time."""
        return self._deltas

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.text.finish_reason

    @property
    def generation(self) -> Generation:
        return self.sequence.result()


class Model:
    """A loaded artifact: tokenizer + backend. Thread-safe: calls share nothing mutable but the session."""

    def __init__(self, artifact: Path, manifest: Manifest, backend: Backend, tokenizer: Tokenizer | None):
        self.artifact, self.manifest, self.backend, self.tokenizer = artifact, manifest, backend, tokenizer
        self.vocab_size: int = manifest.spec.vocab_size
        self.max_context: int = manifest.max_context
        self.eos_token_id = tokenizer.eos_token_id if tokenizer else manifest.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer else manifest.tokenizer.get("pad_token_id")
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0
        self.speculate: Callable[[], Speculator] | None = None  # set by load(speculate=...): batch-1 generations use it

    def speculation(self, draft: str, tokens: int = 4) -> Callable[[], Speculator]:
        """A maker of speculators for this model (runtime/speculate.py): draft "ngram" (prompt lookup) or the folder
        of a draft artifact sharing this model's tokenizer (loaded once, here). Each decoding loop makes its own."""
        check_tokens(tokens)
        check_verifies(self)
        if draft == NGRAM:
            return lambda: Speculator(NgramDrafter(), tokens)
        try:
            # One thread: a second onnxruntime pool would spin after each draft call and take the cores the target's
            # next step needs (measured: the plain steps between tries ran 30 % slower with the draft's own pool).
            drafter = load(draft, threads=1)
        except ArtifactError as exc:
            raise UsageError(f"--speculate takes ngram or a draft artifact's folder: {exc}") from None
        vocab = shared_vocabulary(self, drafter)
        return lambda: Speculator(ModelDrafter(drafter, vocab), tokens)

    # ------------------------------------------------------------------------------------------- inputs

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError(f"{self.artifact} has no tokenizer; pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)  # refuses text that is not valid Unicode
        else:
            try:
                ids = list(prompt)
            except TypeError as exc:
                raise UsageError("a prompt must be a string or a list of integer token ids") from exc
            # Refused, not truncated: 3.7 or True is no token id.
            bad = next((t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))), None)
            if bad is not None:
                raise UsageError(f"token ids must be integers, got {bad!r}")
            ids = [int(t) for t in ids]
        if not ids:
            raise UsageError("a prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer else ""

    def params(self, params: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """One typed options object from either an object or keywords (max_new_tokens=…, temperature=…, stop=…)."""
        if params is not None and options:
            raise UsageError("pass either a SamplingParams or keyword options, not both")
        try:
            return params if params is not None else SamplingParams(**options)
        except TypeError as exc:
            raise UsageError(f"unknown generation option: {exc}") from exc

    def limits(self) -> tuple[int | None, int | None, int]:
        """(max batch, max prompt, max context) of this model on its backend."""
        backend_context = self.backend.max_context
        return self.backend.max_batch, self.backend.max_prompt, min(self.max_context, backend_context or self.max_context)

    def check_fits(self, rows: int, longest: int, params: SamplingParams, context: int | None = None) -> None:
        max_batch, max_prompt, max_context = self.limits()
        # An engine's profile can be narrower than the artifact: check before any token is produced.
        for limit, value, what in ((max_batch, rows, "batch"), (max_prompt, longest, "prompt")):
            if limit is not None and value > limit:
                raise UsageError(f"{what} of {value} exceeds the engine's profile (max {limit}); rebuild with a larger profile")
        context = min(context or max_context, max_context)
        if longest + params.max_new_tokens > context:
            raise UsageError(
                f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                + (f"the artifact's context of {context} tokens" if context == max_context else
                   f"the engine's per-sequence KV budget of {context} tokens (kv_budget / max_running)")
                + "; shorten the prompt or ask for fewer tokens"
            )

    def encode_all(self, prompts: Prompt | Seq[Prompt]) -> list[list[int]]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], (int, float, np.number))):
            prompts = [prompts]
        if not prompts:
            raise UsageError("no prompts given")
        return [self.encode(p) for p in prompts]

    def sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        bad = [s for s in params.stop if isinstance(s, int) and not 0 <= s < self.vocab_size]
        if bad:
            raise UsageError(f"stop id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise UsageError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        stop_ids, stop_strings = stop_sets(params.stop, self.tokenizer, self.eos_token_id)
        return Sequence(prompt_ids, params, self.tokenizer, stop_ids, stop_strings, self.eos_token_id,
                        self.grammars.constraint(params.response_format))

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured output's tokenizer and compiled grammars (built on first use)."""
        return Grammars(self.tokenizer, self.vocab_size, self.eos_token_id)

    # ------------------------------------------------------------------------------------------- generation

    def _run(self, sequences: list[Sequence], params: SamplingParams) -> Iterator[list[Delta | None]]:
        """Step the batch until every sequence is done; yields each step's deltas (None for finished rows)."""
        prompts = [s.prompt_ids for s in sequences]
        width = max(len(p) for p in prompts)
        # A backend with one set of device buffers (TensorRT) serves one generation at a time; callers close
        # this generator when they stop early, which releases the lock.
        speculator = self.speculate() if self.speculate is not None and len(sequences) == 1 else None
        with self.backend.lock if self.backend.exclusive else contextlib.nullcontext():
            batch = DecodeBatch(self.backend)
            logits = batch.prefill(prompts, self.pad_token_id, capacity=width + params.max_new_tokens)
            while True:
                deltas = [None if s.done else s.feed(logits[row]) for row, s in enumerate(sequences)]
                yield deltas
                while speculator is not None and not sequences[0].done and (step := speculator.step(batch, sequences[0])):
                    yield from ([delta] for delta in step[0])
                if all(s.done for s in sequences):
                    return
                start = time.perf_counter()
                logits = batch.step(np.array([s.last_token for s in sequences], dtype=np.int64))
                if speculator is not None:
                    speculator.plain_step(time.perf_counter() - start)  # what a speculative step has to beat

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | None = None, **options: Any) -> list[Generation]:
        """Generate for one prompt or a batch; always returns one Generation per prompt. Options: the fields of
        SamplingParams (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
        presence_penalty, logit_bias, seed, stop, logprobs, response_format)."""
        params = self.params(params, **options)
        encoded = self.encode_all(prompts)
        self.check_fits(len(encoded), max(len(e) for e in encoded), params)
        sequences = [self.sequence(ids, params) for ids in encoded]
        for _ in self._run(sequences, params):
            pass
        return [s.result() for s in sequences]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **options: Any) -> Stream:
        """Text pieces as they are decoded. A piece never ends inside a UTF-8 character (byte-level tokens can
        split one), nor inside what may become a stop string. The returned Stream tells the finish reason."""
        params = self.params(params, **options)
        encoded = self.encode_all(prompt)
        if len(encoded) != 1:
            raise UsageError("stream() takes one prompt; use generate() for batches")
        self.check_fits(1, len(encoded[0]), params)
        sequence = self.sequence(encoded[0], params)
        return Stream((d[0] for d in self._run([sequence], params) if d[0] is not None), sequence)


def load(artifact_dir: str | Path, backend: str | None = None, providers: list[str] | None = None,
         verify: bool = True, threads: int | None = None, speculate: str | None = None,
         speculate_tokens: int = 4) -> Model:
    """Load an artifact folder. Checks the manifest's format version and the sha256 of each file it reads.
    speculate: "ngram" or a draft artifact's folder: single-prompt generations decode speculatively (exact: the same
    tokens as without), drafting `speculate_tokens` at a time."""
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    tokenizer_files = [n for n in TOKENIZER_FILES if n in manifest.files and n != CHAT_TEMPLATE_FILE]
    for name in (manifest.onnx.file, manifest.onnx.external_data):
        artifact_path(artifact, name)  # confined to the folder even with verify=False
    if verify:  # every listed file, not only the ones this call reads; the TensorRT backend hashes its engine as
        # it reads it (read_verified), so it is not read a second time here
        engine = (manifest.engine or {}).get("file") if backend in ("tensorrt", "trt") else None
        verify_files(manifest, [n for n in manifest.files if n != engine])
    tokenizer = Tokenizer.from_dir(artifact) if tokenizer_files else None
    model = Model(artifact, manifest, create_backend(backend, artifact, manifest, providers, threads), tokenizer)
    if speculate is not None:
        model.speculate = model.speculation(speculate, speculate_tokens)
    return model

