"""`neodeploy check`: replay golden.npz with the runtime alone (no torch) — the CI / new-machine gate.

For each golden case: the last-position logits of the prompt must match the reference's within the
artifact's tolerance (a fraction of the logit scale), and greedy decoding must reproduce the reference's
tokens, except where the reference's own top-k shows a near tie (margin within the tolerance).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from neodeploy.core.errors import ArtifactError
from neodeploy.core.manifest import verify_files
from neodeploy.runtime.batch import DecodeBatch
from neodeploy.runtime.model import Model

GOLDEN = "golden.npz"


@dataclass
class CheckResult:
    case: str
    batch: int
    max_abs_error: float
    scale: float
    tolerance: float
    greedy_agree: int
    greedy_total: int
    passed: bool
    seconds: float
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None


def _load_golden(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path} is not a readable golden file ({exc}); re-export the artifact") from exc


def clear_preference(preferred: np.ndarray | float, other: np.ndarray | float, tolerance: float,
                     scale: float) -> np.ndarray | bool:
    """The tie rule for greedy tokens: where a run picks `other` instead of the reference's `preferred` token (each
    given as the reference's logit for it; -inf when unknown), it truly diverges only if the reference prefers its
    token by more than the tolerance (a fraction of the logit scale). Within that margin rounding may flip the pick."""
    return np.asarray(preferred) - np.asarray(other) > tolerance * scale


def run_check(model: Model) -> list[CheckResult]:
    verify_files(model.manifest, [GOLDEN])
    golden = _load_golden(model.artifact / GOLDEN)
    tolerance = float(golden["tolerance"])
    results = []
    for name in golden["cases"].tolist():
        start = time.perf_counter()
        ids, mask = golden[f"{name}/input_ids"], golden[f"{name}/attention_mask"]
        want_tokens, want_last = golden[f"{name}/tokens"], golden[f"{name}/last_logits"]
        topk_ids, topk_logits = golden[f"{name}/topk_ids"], golden[f"{name}/topk_logits"]
        limits = {"batch": (model.backend.max_batch, ids.shape[0]),
                  "prompt": (model.backend.max_prompt, ids.shape[1]),
                  "context": (model.backend.max_context, ids.shape[1] + want_tokens.shape[1])}
        outside = [f"{what} {value} > {limit}" for what, (limit, value) in limits.items() if limit and value > limit]
        if outside:  # an engine built for a narrower profile cannot run this case: say so, do not abort the gate
            results.append(CheckResult(name, ids.shape[0], float("nan"), float("nan"), tolerance, 0, 0, True, 0.0,
                                       skipped="outside the engine's profile: " + ", ".join(outside)))
            continue
        # A backend with one set of device buffers (TensorRT) may be serving a generation of the same Model: hold
        # its lock for the case, as Model does for a generation, or the two would overwrite each other's cache.
        with model.backend.lock if model.backend.exclusive else contextlib.nullcontext():
            batch = DecodeBatch(model.backend)
            logits = batch.start(ids, mask, capacity=ids.shape[1] + want_tokens.shape[1])
            scale = float(golden[f"{name}/scale"]) if f"{name}/scale" in golden else float(np.abs(want_last).max())
            err = float(np.abs(logits - want_last).max())
            failures = []
            if not np.isfinite(logits).all():
                failures.append("non-finite logits")
            if not err <= tolerance * scale:
                failures.append(f"max |Δlogit| {err:.3g} > {tolerance:g} x scale {scale:.3g}")
            agree, diverged = 0, False
            tokens = logits.argmax(-1)
            steps = want_tokens.shape[1]
            for step in range(steps):
                ok = tokens == want_tokens[:, step]
                agree += int(ok.sum())
                for row in np.flatnonzero(~ok):
                    # A tie in the reference is no failure: does the reference prefer its token by a clear margin?
                    listed = topk_ids[row, step] == tokens[row]
                    chosen = topk_logits[row, step][listed][0] if listed.any() else -np.inf
                    if clear_preference(topk_logits[row, step, 0], chosen, tolerance, scale):
                        diverged = True
                if diverged or step == steps - 1:
                    break
                # Teacher-forced: feed the reference's tokens, so one tie does not derail every later step.
                logits = batch.step(want_tokens[:, step].astype(np.int64))
                tokens = logits.argmax(-1)
        if diverged and str(golden["precision"]) == "fp32":  # as at export: lower precisions may fork at a close call
            failures.append(f"greedy tokens diverge from the reference ({agree}/{want_tokens.size} agree)")
        results.append(CheckResult(name, ids.shape[0], err, scale, tolerance, agree, want_tokens.size,
                                   not failures, round(time.perf_counter() - start, 3), failures))
    return results


def run_engine_check(model: Model, engine) -> list[str]:
    """The golden prompts through the engine as configured — batched, behind a prefix the prefix cache holds, and
    alone where the engine speculates — each output compared with plain decoding of the same prompt (Model.generate
    alone, which run_check held to the reference). The serve gate: an engine optimisation that changes an output on
    this machine is refused like a drifted artifact. Returns one line per failure.

    An artifact whose outputs depend on the batch by design (int8 and int4 round activations to int8 inside each
    call: Quantization.depends_on_batch) runs every prompt alone instead: batched, its tokens may differ from plain
    decoding within its accuracy (docs/decisions.md), which is no drift of this machine's."""
    from neodeploy.runtime.prefix import BLOCK

    golden = _load_golden(model.artifact / GOLDEN)
    steps = int(golden[f"{golden['cases'].tolist()[0]}/tokens"].shape[1])
    rows = [[int(t) for t, m in zip(ids, mask) if m]
            for name in golden["cases"].tolist()
            for ids, mask in zip(golden[f"{name}/input_ids"], golden[f"{name}/attention_mask"])]
    room = engine.capacity - steps - max(len(r) for r in rows)
    shared = [t for row in rows for t in row] * (2 * BLOCK)  # a prefix of two blocks, whatever the prompts' lengths
    shared = shared[: max(0, min(2 * BLOCK, room))]
    prompts = [[*shared, *row] for row in rows if len(shared) + len(row) + steps <= engine.capacity]
    if not prompts:
        return []
    failures = []
    # Alone: the first fills the prefix cache; speculation runs while a request decodes alone, so then every one.
    quantization = model.manifest.quantization
    batched = quantization is None or not quantization.depends_on_batch
    alone = prompts if engine.speculator is not None or not batched else prompts[:1]
    together = prompts if batched else []
    results = [engine.submit(p, max_new_tokens=steps).result() for p in alone]
    wave = engine.max_running + engine.config.max_waiting  # together, as many as the engine takes at once
    for start in range(0, len(together), wave):
        handles = [engine.submit(p, max_new_tokens=steps) for p in together[start:start + wave]]
        results += [h.result() for h in handles]
    for i, (prompt, got) in enumerate(zip([*alone, *together], results)):
        want = model.generate(prompt, max_new_tokens=steps)[0]
        if got.output_ids != want.output_ids:
            failures.append(f"engine request {i} ({len(prompt)} prompt tokens) differs from plain decoding")
    return failures


def check_table(results: list[CheckResult]) -> str:
    lines = [f"{'case':<10} {'batch':>5} {'max|Δlogit|':>12} {'scale':>8} {'bound':>10} {'greedy':>8}  result"]
    for r in results:
        if r.skipped:
            lines.append(f"{r.case:<10} {r.batch:>5}  skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.case:<10} {r.batch:>5} {r.max_abs_error:>12.3e} {r.scale:>8.3g} {r.tolerance * r.scale:>10.3e} "
            f"{f'{r.greedy_agree}/{r.greedy_total}':>8}  " + ("ok" if r.passed else "FAIL: " + "; ".join(r.failures))
        )
    return "\n".join(lines)


def write_report(path: Path, model: Model, results: list[CheckResult]) -> None:
    report = {
        "artifact": str(model.artifact),
        "backend": model.backend.name,
        "passed": all(r.passed for r in results),
        "cases": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_junit(path: Path, model: Model, results: list[CheckResult]) -> None:
    failures = sum(not r.passed for r in results)
    cases = []
    for r in results:
        body = "" if r.passed else f'<failure message="{escape("; ".join(r.failures), {chr(34): "&quot;"})}"/>'
        cases.append(f'    <testcase classname="neodeploy.check" name="{escape(r.case)}" time="{r.seconds}">{body}</testcase>')
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<testsuites><testsuite name="neodeploy check {escape(model.artifact.name)}" tests="{len(results)}" '
        f'failures="{failures}" errors="0">\n' + "\n".join(cases) + "\n</testsuite></testsuites>\n"
    )
    path.write_text(xml)
