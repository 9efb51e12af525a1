"""`neodeploy validate`: the runtime and the PyTorch reference side by side on prompts, with per-step errors,
top-1 agreement, the identical greedy prefix and perplexity; `--layerwise` finds the first block that drifts.

Gates: neodeploy.core.tolerances, per precision (relative errors are max |Δlogit| over max |reference logit| at
that step). The first prompt is the export's golden short prompt.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from neodeploy.core.errors import UsageError
from neodeploy.core.progress import live
from neodeploy.core.tolerances import TOLERANCES, Tolerance
from neodeploy.export.verify import SHORT_TEXT
from neodeploy.runtime.batch import DecodeBatch, position_ids
from neodeploy.runtime.model import Model

DEFAULT_PROMPTS = (
    SHORT_TEXT,
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time",
)
PERPLEXITY_TEXT = (
    "Return a new list containing all items from the iterable in ascending order. A custom key function can "
    "be supplied to customize the sort order, and the reverse flag can be set to request the result in "
    "descending order. The sort is stable: equal elements keep their relative order. "
)


@dataclass
class PromptReport:
    prompt: str
    prompt_tokens: int
    steps: list[dict]
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    greedy_prefix: int
    greedy_total: int


@dataclass
class Report:
    artifact: str
    reference: str
    precision: str
    tolerances: Tolerance
    prompts: list[PromptReport]
    perplexity: dict
    layerwise: dict | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _runtime_step_logits(model: Model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """Teacher-forced: the logits before each of `tokens`, fed the reference's own tokens."""
    batch = DecodeBatch(model.backend)
    out = [batch.prefill([ids], model.pad_token_id, capacity=len(ids) + len(tokens))[0]]
    for token in tokens[:-1]:
        out.append(batch.step(np.array([token]))[0])
    return np.stack(out)


def _runtime_greedy(model: Model, ids: list[int], n: int) -> list[int]:
    """Free-running greedy through the backend, n tokens, no stop on eos (the reference's loop does the same)."""
    batch = DecodeBatch(model.backend)
    out = [int(batch.prefill([ids], model.pad_token_id, capacity=len(ids) + n)[0].argmax())]
    while len(out) < n:
        out.append(int(batch.step(np.array([out[-1]]))[0].argmax()))
    return out


def _perplexity(log_probs_of_next: np.ndarray) -> float:
    return float(math.exp(-log_probs_of_next.mean()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def validate(model: Model, checkpoint: str | Path, prompts: list[str] | None = None, steps: int = 32,
             layerwise: bool = False, echo=print) -> Report:
    from neodeploy.reference.checkpoint import load_checkpoint

    precision = model.manifest.precision
    tol = TOLERANCES[precision]
    if model.tokenizer is None:
        raise UsageError(f"{model.artifact} has no tokenizer; validate runs text prompts, export from a checkpoint "
                         "with tokenizer files")
    if layerwise and model.manifest.quantization:
        raise UsageError("--layerwise compares unquantised blocks; run it on the fp32 or fp16 export of this model")
    reference = load_checkpoint(checkpoint)
    if reference.spec != model.manifest.spec:
        raise UsageError(f"{checkpoint} is not the checkpoint this artifact was exported from (the specs differ)")
    prompts = list(prompts or DEFAULT_PROMPTS)
    reports = []
    with live("validate", total=len(prompts), unit="prompt") as bar:
        for prompt in prompts:
            reports.append(_validate_prompt(model, reference, prompt, steps))
            bar.update()
    return _finish(model, reference, checkpoint, prompts, reports, precision, tol, layerwise, echo)


def _validate_prompt(model: Model, reference, prompt: str, steps: int) -> PromptReport:
    from neodeploy.reference.generate import greedy_generate

    ids = model.encode(prompt)
    n = min(steps, model.max_context - len(ids))
    if n < 1:
        raise UsageError(f"prompt {prompt[:30]!r} leaves no room for a step within the context")
    # One reference pass: its greedy tokens and the logits each was chosen from (the teacher-forced run).
    ref = greedy_generate(reference, ids, n, keep_logits=True)
    ref_tokens, ref_logits = ref.output_ids, np.stack(ref.step_logits)
    ours = _runtime_greedy(model, ids, n)
    run_logits = _runtime_step_logits(model, ids, ref_tokens)
    abs_err = np.abs(run_logits - ref_logits).max(-1)
    rel_err = abs_err / np.abs(ref_logits).max(-1)
    top1 = run_logits.argmax(-1) == ref_logits.argmax(-1)
    ranked = np.sort(ref_logits, axis=-1)
    margin = ranked[:, -1] - ranked[:, -2]  # how clearly the reference prefers its token
    prefix = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), min(len(ours), len(ref_tokens)))
    return PromptReport(
        prompt, len(ids),
        [{"step": i, "max_abs_error": float(a), "rel_error": float(r), "top1": bool(t),
          "reference_margin": float(m)} for i, (a, r, t, m) in enumerate(zip(abs_err, rel_err, top1, margin))],
        float(abs_err.max()), float(rel_err.max()), float(top1.mean()), prefix, len(ref_tokens),
    )


def _finish(model: Model, reference, checkpoint, prompts, reports, precision, tol, layerwise, echo) -> Report:
    ppl = _perplexities(model, reference)
    report = Report(str(model.artifact), str(checkpoint), precision, tol, reports, ppl)
    worst = max(r.max_rel_error for r in reports)
    agreement = float(np.mean([s["top1"] for r in reports for s in r.steps]))
    if not worst <= tol.max_rel_error:
        report.failures.append(f"max relative logit error {worst:.3g} > {tol.max_rel_error:g}")
    if agreement < tol.top1_agreement:
        report.failures.append(f"top-1 agreement {agreement:.1%} < {tol.top1_agreement:.0%}")
    if not abs(ppl["ratio"] - 1) <= tol.ppl_ratio:
        report.failures.append(f"perplexity ratio {ppl['ratio']:.5f} is off 1 by more than {tol.ppl_ratio:g}")
    if layerwise:
        report.layerwise = _layerwise(model, reference, checkpoint, model.encode(prompts[0]), tol.max_rel_error, echo)
    return report


def _perplexities(model: Model, reference) -> dict:
    import torch

    text_ids = model.encode(PERPLEXITY_TEXT) if model.tokenizer else list(range(1, 65))
    while len(text_ids) < 128 and model.tokenizer:
        text_ids += model.encode(" " + PERPLEXITY_TEXT)
    text_ids = text_ids[: min(256, model.max_context)]
    ids = np.array([text_ids], np.int64)
    mask = np.ones_like(ids)
    if model.manifest.onnx.logits == "all":
        ours = model.backend.score(ids, mask, position_ids(mask))[0]
    else:  # last-position graphs (CPU target): one cached step per token gives every position's logits
        ours = _runtime_step_logits(model, text_ids[:1], text_ids[1:] + [0])
    with torch.inference_mode():
        ref = reference(torch.from_numpy(ids))[0][0].numpy()
    targets = ids[0, 1:]
    lp_ours = np.take_along_axis(_log_softmax(ours[:-1]), targets[:, None], -1)[:, 0]
    lp_ref = np.take_along_axis(_log_softmax(ref[:-1]), targets[:, None], -1)[:, 0]
    p_ours, p_ref = _perplexity(lp_ours), _perplexity(lp_ref)
    return {"tokens": int(len(targets)), "reference": p_ref, "runtime": p_ours, "ratio": p_ours / p_ref}


def _layerwise(model: Model, reference, checkpoint, ids: list[int], tolerance: float, echo) -> dict:
    """Export a debug graph that also outputs every block's hidden state; compare them with the reference's."""
    import onnxruntime as ort
    import torch

    from neodeploy.export import graph

    precision = model.manifest.dtype
    spec = reference.spec
    with tempfile.TemporaryDirectory(prefix="neodeploy-layerwise-") as tmp:
        path = Path(tmp) / "debug.onnx"
        echo(f"layerwise: exporting a debug graph with {spec.num_layers + 1} hidden-state outputs ({precision}) ...")
        graph.trace_in_subprocess(Path(checkpoint), path, model.manifest.onnx.opset, precision, hidden_states=True)
        graph.convert(path, spec, precision, hidden_states=True)
        _bind_artifact_weights(path, model.artifact / model.manifest.onnx.file)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        kv = np.float16 if precision == "fp16" else np.float32
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
        for name in graph.input_names(spec)[3:]:
            feed[name] = np.zeros((1, spec.num_heads, 0, spec.head_dim), kv)
        names = [f"hidden_states.{i}" for i in range(spec.num_layers + 1)]
        ours = session.run(names, feed)
    with torch.inference_mode():
        _, _, hidden = reference(torch.tensor([ids]), output_hidden_states=True)
    errors = []
    for got, want in zip(ours, hidden):
        want = want.float().numpy()
        errors.append(float(np.abs(got.astype(np.float32) - want).max() / max(np.abs(want).max(), 1e-12)))
    first = next((i for i, e in enumerate(errors) if e > tolerance), None)
    return {"relative_errors": errors, "tolerance": tolerance, "first_layer_beyond_tolerance": first,
            "labels": ["embeddings"] + [f"block {i}" for i in range(spec.num_layers)]}


def _bind_artifact_weights(debug: Path, artifact_onnx: Path) -> None:
    """Point the debug graph's weights at the artifact's own data, so layerwise sees what the artifact runs
    (a corrupted or mis-converted weight shows up in the block that holds it), not a fresh export."""
    import os
    import shutil

    import onnx

    ours = onnx.load(str(debug), load_external_data=False)
    theirs = onnx.load(str(artifact_onnx), load_external_data=False)
    source = {t.name: t for t in theirs.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    data_name = "artifact.onnx.data"
    location = next(iter({e.value for t in source.values() for e in t.external_data if e.key == "location"}), None)
    if location is None:
        return
    try:
        os.link(artifact_onnx.parent / location, debug.parent / data_name)
    except OSError:
        shutil.copyfile(artifact_onnx.parent / location, debug.parent / data_name)
    for tensor in ours.graph.initializer:
        match = source.get(tensor.name)
        if match is None or list(match.dims) != list(tensor.dims) or match.data_type != tensor.data_type:
            continue
        del tensor.external_data[:]
        for entry in match.external_data:
            tensor.external_data.add(key=entry.key, value=data_name if entry.key == "location" else entry.value)
    onnx.save_model(ours, str(debug))


def validate_table(report: Report) -> str:
    lines = [f"{'prompt':<24} {'tokens':>6} {'steps':>5} {'max|Δlogit|':>12} {'max rel':>9} {'top-1':>7} {'greedy prefix':>14}"]
    for r in report.prompts:
        label = r.prompt.replace("\n", "⏎")
        label = label if len(label) <= 24 else label[:21] + "..."
        lines.append(f"{label:<24} {r.prompt_tokens:>6} {len(r.steps):>5} {r.max_abs_error:>12.3e} "
                     f"{r.max_rel_error:>9.2e} {r.top1_agreement:>7.1%} {f'{r.greedy_prefix}/{r.greedy_total}':>14}")
    misses = [s for r in report.prompts for s in r.steps if not s["top1"]]
    if misses:  # a flip where the reference itself barely prefers its token is a tie, not a broken model
        total = sum(len(r.steps) for r in report.prompts)
        lines.append(f"top-1 disagreements: {len(misses)} of {total} steps, at reference top-2 margins up to "
                     f"{max(s['reference_margin'] for s in misses):.3g} (max |Δlogit| there "
                     f"{max(s['max_abs_error'] for s in misses):.3g})")
    p = report.perplexity
    lines.append(f"perplexity over {p['tokens']} tokens: reference {p['reference']:.4f}, runtime {p['runtime']:.4f}, "
                 f"ratio {p['ratio']:.6f}")
    if report.layerwise:
        lw = report.layerwise
        errors = ", ".join(f"{label}: {e:.1e}" for label, e in zip(lw["labels"], lw["relative_errors"]))
        first = lw["first_layer_beyond_tolerance"]
        lines.append(f"layerwise relative error of hidden states: {errors}")
        lines.append("first block beyond tolerance: " + ("none" if first is None else lw["labels"][first]))
    t = report.tolerances
    lines.append(f"gates ({report.precision}): max rel <= {t.max_rel_error:g}, top-1 >= {t.top1_agreement:.0%}, "
                 f"|ppl ratio - 1| <= {t.ppl_ratio:g}")
    lines.append("validate passed" if report.passed else "validate FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)


def write_report(path: Path, report: Report) -> None:
    data = asdict(report)
    data["passed"] = report.passed
    path.write_text(json.dumps(data, indent=2) + "\n")
