"""Verification inside export: the ONNX graph in onnxruntime (CPU) against the fp32 reference on golden prompts.

Cases: a short prompt, one longer than the GPT-Neo window (or 300 tokens), a left-padded batch of 3; each
prefilled and then decoded for 16 greedy steps through the cache. The decode is teacher-forced with the
reference's tokens, so every step compares logits on the same context; a greedy divergence counts only
when the reference itself prefers its token by more than the tolerance (a true divergence, not a tie).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodeploy.core.tolerances import TOLERANCES
from neodeploy.runtime.aligned import align_left, lengths_mask
from neodeploy.runtime.check import clear_preference
from neodeploy.runtime.model import left_pad, position_ids

DECODE_STEPS = 16
TOP_K = 10
# The gate is TOLERANCES[precision].max_rel_error: max abs logit error as a fraction of the logit scale (max
# |reference logit| in the case).
SHORT_TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = (
    "In the beginning the Universe was created. This has made a lot of people very angry and been widely "
    "regarded as a bad move. Many were increasingly of the opinion that they'd all made a big mistake in "
    "coming down from the trees in the first place. "
)
BATCH_TEXTS = ("Hello world", "A much longer prompt that needs several more tokens than the others do", "Hi")


@dataclass
class Case:
    name: str
    input_ids: np.ndarray  # [batch, seq] int64, left-padded
    attention_mask: np.ndarray  # [batch, seq] int64
    # Filled by the reference:
    tokens: np.ndarray | None = None  # [batch, steps] greedy tokens
    prefill_logits: np.ndarray | None = None  # [batch, seq, vocab]
    step_logits: np.ndarray | None = None  # [batch, steps, vocab]; step 0 = last prompt position


@dataclass
class CaseResult:
    name: str
    batch: int
    prompt_lengths: list[int]
    max_abs_error: float
    scale: float
    greedy_agree: int
    greedy_total: int
    true_divergences: int
    passed: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.scale if self.scale else float("inf")


def golden_cases(spec, tokenizer, max_context: int) -> list[Case]:
    """The golden prompts: tokenised text when the artifact has a tokenizer, seeded ids otherwise."""
    rng = np.random.default_rng(0)
    vocab = min(spec.vocab_size, tokenizer.vocab_size) if tokenizer else spec.vocab_size
    room = max_context - DECODE_STEPS
    long_len = max(300, (spec.window_size or 0) + 44)
    long_len = min(long_len, room)

    def encode(text: str, length: int | None = None) -> list[int]:
        if tokenizer is None:
            return rng.integers(0, vocab, size=length or max(4, len(text) // 4)).tolist()
        ids = tokenizer.encode(text)
        while length and len(ids) < length:
            ids = ids + tokenizer.encode(" " + text)
        return ids[:length] if length else ids

    short = encode(SHORT_TEXT)[: max(1, room)]
    pad = tokenizer.pad_token_id if tokenizer and tokenizer.pad_token_id is not None else 0
    rows = [encode(t)[:room] for t in BATCH_TEXTS]
    cases = [
        Case("short", *left_pad([short], pad)),
        Case("long", *left_pad([encode(LONG_TEXT, long_len)], pad)),
        Case("padded-x3", *left_pad(rows, pad)),
    ]
    return cases


def run_reference(model, cases: list[Case], steps: int = DECODE_STEPS) -> None:
    """Greedy decode each case with the PyTorch reference (fp32), recording tokens and logits."""
    import torch

    with torch.inference_mode():
        for case in cases:
            ids = torch.from_numpy(case.input_ids)
            mask = torch.from_numpy(case.attention_mask)
            logits, past = model(ids, mask, torch.from_numpy(position_ids(case.attention_mask)))
            case.prefill_logits = logits.numpy().copy()
            step_logits, tokens = [logits[:, -1]], []
            for step in range(steps):
                token = step_logits[-1].argmax(-1, keepdim=True)
                tokens.append(token)
                if step == steps - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                pos = torch.from_numpy(position_ids(mask.numpy())[:, -1:])
                logits, past = model(token, mask, pos, past)
                step_logits.append(logits[:, -1])
            case.tokens = torch.cat(tokens, dim=1).numpy()
            case.step_logits = torch.stack(step_logits, dim=1).numpy()


def _reference_of_checkpoint(checkpoint: str, cases: list[Case], steps: int) -> list[Case]:
    import torch

    from neodeploy.reference.checkpoint import load_checkpoint

    run_reference(load_checkpoint(checkpoint, dtype=torch.float32), cases, steps)
    return cases


def reference_in_subprocess(checkpoint: Path, cases: list[Case], steps: int = DECODE_STEPS) -> list[Case]:
    """run_reference on the checkpoint in a child process, so the fp32 model's memory is the OS's again after."""
    from neodeploy.export.graph import in_subprocess

    return in_subprocess(_reference_of_checkpoint, str(checkpoint), cases, steps)


class OnnxDecoder:
    """Plain onnxruntime fed with the graph's own names: the numpy path verification needs, nothing more."""

    def __init__(self, path: Path, spec, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.spec = spec
        kv_input = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.tail = any(i.name == "num_logits" for i in self.session.get_inputs())  # CPU target: feed 1 (the last)
        self.kv_dtype = np.float16 if kv_input.type == "tensor(float16)" else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.spec.num_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.spec.num_layers)]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: list[np.ndarray]):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.spec.num_layers):
            feed[f"past_key_values.{i}.key"] = cache[2 * i]
            feed[f"past_key_values.{i}.value"] = cache[2 * i + 1]
        if self.tail:
            feed["num_logits"] = np.array([1], np.int64)
        out = self.session.run(None, feed)
        return out[0], out[1:]


def compare(decoder: OnnxDecoder, case: Case, precision: str, aligned: bool = False) -> CaseResult:
    """Prefill then teacher-forced decode in onnxruntime; errors against the reference's logits. aligned: feed the
    CUDA target's layout (rows left-aligned, masks right-padded: runtime/aligned.py) instead of left padding."""
    tol = TOLERANCES[precision].max_rel_error
    ids, mask = align_left(case.input_ids, case.attention_mask) if aligned else (case.input_ids, case.attention_mask)
    logits, cache = decoder(ids, mask, position_ids(mask), decoder.empty_cache(mask.shape[0]))
    mask = case.attention_mask  # the reference's (left-padded) positions, for what follows
    # A CPU-target graph returns the last position only; left padding puts every row's last token there.
    want = case.prefill_logits[:, -logits.shape[1]:]
    real = mask[:, -logits.shape[1]:].astype(bool)
    errors = [np.abs(logits - want)[real].max()]
    scale = float(np.abs(want[real]).max())
    step_logits = [logits[:, -1]]
    for step in range(case.tokens.shape[1] - 1):
        token = case.tokens[:, step : step + 1].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        fed = lengths_mask(mask.sum(1)) if aligned else mask
        logits, cache = decoder(token, fed, position_ids(mask)[:, -1:], cache)
        step_logits.append(logits[:, -1])
    ours = np.stack(step_logits, axis=1)
    errors.append(np.abs(ours - case.step_logits).max())
    scale = max(scale, float(np.abs(case.step_logits).max()))
    max_err = float(max(errors))
    chosen = ours.argmax(-1)
    agree = int((chosen == case.tokens).sum())
    ref = case.step_logits
    preferred = np.take_along_axis(ref, case.tokens[..., None], -1)[..., 0]
    picked = np.take_along_axis(ref, chosen[..., None], -1)[..., 0]
    true_div = int(((chosen != case.tokens) & clear_preference(preferred, picked, tol, scale)).sum())
    result = CaseResult(case.name, mask.shape[0], case.attention_mask.sum(1).tolist(), max_err, scale, agree,
                        case.tokens.size, true_div)
    if not np.isfinite(ours).all() or not np.isfinite(max_err):
        result.passed = False
        result.notes.append("non-finite logits")
    if max_err > tol * scale:
        result.passed = False
        result.notes.append(f"max |Δlogit| {max_err:.3g} > {tol:g} × scale {scale:.3g}")
    if precision == "fp32" and true_div:  # lower precisions may legitimately fork at a close call
        result.passed = False
        result.notes.append(f"{true_div} greedy tokens diverge")
    return result


def verification_table(results: list[CaseResult], precision: str) -> str:
    lines = [
        f"{'case':<10} {'batch':>5} {'prompt':>9} {'max|Δlogit|':>12} {'scale':>8} {'rel':>9} {'bound':>7} "
        f"{'greedy':>8}  result"
    ]
    for r in results:
        prompt = str(r.prompt_lengths[0]) if len(set(r.prompt_lengths)) == 1 else f"{min(r.prompt_lengths)}..{max(r.prompt_lengths)}"
        lines.append(
            f"{r.name:<10} {r.batch:>5} {prompt:>9} {r.max_abs_error:>12.3e} {r.scale:>8.3g} {r.relative_error:>9.2e} "
            f"{TOLERANCES[precision].max_rel_error:>7.2g} {f'{r.greedy_agree}/{r.greedy_total}':>8}  "
            + ("ok" if r.passed else "FAIL: " + "; ".join(r.notes))
        )
    return "\n".join(lines)


def save_golden(path: Path, cases: list[Case], precision: str, results: list[CaseResult]) -> None:
    """golden.npz: prompts, the reference's greedy tokens, last-position logits and per-step top-k, and each case's
    logit scale exactly as the export's verification computed it (over the positions the graph returns), so
    `check` applies the very bound the export passed."""
    scales = {r.name: r.scale for r in results}
    arrays: dict[str, np.ndarray] = {
        "cases": np.array([c.name for c in cases]),
        "precision": np.array(precision),
        "tolerance": np.array(TOLERANCES[precision].max_rel_error, dtype=np.float64),
        "decode_steps": np.array(DECODE_STEPS),
    }
    for c in cases:
        top = np.argsort(-c.step_logits, axis=-1)[..., :TOP_K]
        arrays[f"{c.name}/input_ids"] = c.input_ids
        arrays[f"{c.name}/attention_mask"] = c.attention_mask
        arrays[f"{c.name}/tokens"] = c.tokens.astype(np.int64)
        arrays[f"{c.name}/last_logits"] = c.step_logits[:, 0].astype(np.float32)
        arrays[f"{c.name}/topk_ids"] = top.astype(np.int64)
        arrays[f"{c.name}/topk_logits"] = np.take_along_axis(c.step_logits, top, -1).astype(np.float32)
        arrays[f"{c.name}/scale"] = np.array(scales[c.name])
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_golden(path: Path) -> list[Case]:
    """Cases from golden.npz with tokens and the last-position logits (what the runtime can re-check)."""
    with np.load(path, allow_pickle=False) as data:
        cases = []
        for name in data["cases"].tolist():
            case = Case(name, data[f"{name}/input_ids"], data[f"{name}/attention_mask"])
            case.tokens = data[f"{name}/tokens"]
            case.step_logits = data[f"{name}/last_logits"][:, None]
            cases.append(case)
        return cases
