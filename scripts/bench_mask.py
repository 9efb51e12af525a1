"""What constrained decoding costs per decode step, against the step's own (model) time.

    python scripts/bench_mask.py ARTIFACT [--batch 1,8] [--tokens 120] [--repeats 3]

For each batch size: `batch` json_schema requests (an object holding an array of bounded integers, long enough to
decode `--tokens` steps) run through the engine; the time spent computing and applying the grammar's mask
(llguidance's mask, its unpacking, the masked copy of the row, consuming the token) is summed per step and set
against the model step (DecodeBatch.step) the engine's observer times. Then the same requests unconstrained, for the
end-to-end tokens/s either way. Prints the CPU model and the load, since this machine is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["values"],
          "properties": {"values": {"type": "array", "minItems": 200, "maxItems": 200,
                                    "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


class Timers:
    """Wraps the functions constrained decoding adds to a step and sums their time."""

    def __init__(self):
        from neodeploy.runtime import grammar, sampling

        self.seconds = defaultdict(float)
        self._patched = []
        self.wrap(grammar.Constraint, "allowed", "mask")
        self.wrap(grammar.Constraint, "consume", "consume")
        original = sampling.adjusted

        def adjusted(logits, history, outputs, params, allowed=None):
            start = time.perf_counter()
            try:
                return original(logits, history, outputs, params, allowed)
            finally:
                if allowed is not None:
                    self.seconds["apply"] += time.perf_counter() - start

        sampling.adjusted = adjusted
        self._patched.append((sampling, "adjusted", original))

    def wrap(self, owner, name, key):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))


class StepTimes:
    def __init__(self):
        self.steps, self.seconds = 0, 0.0

    def step(self, batch_size, seconds):
        self.steps += 1
        self.seconds += seconds

    def token(self, handle, first, seconds):
        pass

    def finished(self, handle, reason):
        pass


def run(model, batch: int, tokens: int, constrained: bool, timers: Timers | None):
    from neodeploy.runtime.engine import Engine, EngineConfig
    from neodeploy.runtime.sampling import SamplingParams

    steps = StepTimes()
    engine = Engine(model, EngineConfig(max_running=batch), steps)
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}} if constrained else None
    if timers:
        timers.seconds.clear()
    try:
        start = time.perf_counter()
        handles = [engine.submit("Numbers:", SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=i,
                                                            response_format=fmt)) for i in range(batch)]
        results = [h.result(600) for h in handles]
        wall = time.perf_counter() - start
    finally:
        engine.close()
    generated = sum(len(r.output_ids) for r in results)
    return steps, wall, generated, dict(timers.seconds) if timers else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from neodeploy.runtime import load
    from neodeploy.runtime.grammar import Grammar

    model = load(args.artifact)
    model.grammars.matcher(Grammar.json_schema(SCHEMA))  # compiled before the timing
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"artifact: {args.artifact} ({model.manifest.spec.family}, vocab {model.vocab_size}, "
          f"{model.manifest.onnx.target} target, {model.manifest.precision})")
    print("batch | model step ms | mask ms/step (compute + apply + consume) | mask / step | tok/s constrained | "
          "tok/s free")
    timers = Timers()
    for batch in (int(b) for b in args.batch.split(",")):
        rows = []
        for _ in range(args.repeats):  # alternating, constrained first then free, each repeat
            steps, wall, generated, seconds = run(model, batch, args.tokens, True, timers)
            _, free_wall, free_generated, _ = run(model, batch, args.tokens, False, None)
            mask = sum(seconds.values())
            rows.append((steps.seconds / steps.steps, mask / steps.steps, seconds, generated / wall,
                         free_generated / free_wall))
        rows.sort(key=lambda r: r[1] / r[0])
        step, mask, seconds, tps, free_tps = rows[len(rows) // 2]  # the median repeat by ratio
        parts = ", ".join(f"{k} {v / (sum(seconds.values()) or 1) * 100:.0f}%" for k, v in sorted(seconds.items()))
        print(f"{batch:5d} | {step * 1000:13.2f} | {mask * 1000:8.3f} ({parts}) | {mask / step * 100:10.1f}% | "
              f"{tps:17.1f} | {free_tps:10.1f}")


if __name__ == "__main__":
    main()
