"""The demo: the main job end to end on a built-in default, with no network and no user files.

A tiny byte-level GPT-NeoX trained on the standard library's docstrings for a fixed number of seeded steps is
exported, generated from with the torch-free runtime, and judged by `check` and `validate`. By default the demo uses
the copy shipped in `demo_model/` (made by `train_demo_model` with the defaults below, 3 minutes on a busy 2-core
machine), so its model and text are the same on every machine and it runs in about a minute; `--train-steps N`
trains anew (then the corpus is the installed Python's docstrings). `neodeploy demo` is a thin adapter over
`run_demo`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neodeploy.core.errors import UsageError
from neodeploy.core.spec import human_count, preset

DEFAULT_PROMPT = "Return the"
# Enough for words, measured by steps (not seconds, so the model does not depend on the machine's speed): greedy from
# "Return the" gives "the the the ..." at 300-900 steps and fragments ("comparames") at 1000; at 1200 (held-out loss
# 2.09 nats per byte, uniform 5.55) it is words, "Return the and a context the and a context".
TRAIN_STEPS = 1200
TRAIN_LR = 6e-3
TRAIN_SEED = 0
# One thread: a float sum split over a different number of threads rounds differently, and the demo's model must
# not depend on how many cores the machine has.
TRAIN_THREADS = 1
SHIPPED = Path(__file__).resolve().parent / "demo_model"  # train_demo_model(TRAIN_STEPS)'s output, Python 3.11


@dataclass(frozen=True)
class DemoOptions:
    preset: str | None = None            # a random-initialised published architecture instead of the trained default
    train_steps: int | None = None       # None: the shipped model (TRAIN_STEPS steps); N: train anew for N steps
    train_seconds: float | None = None   # an optional time cap (then the model depends on the machine's speed)
    workdir: Path | None = None          # keep the checkpoint and the artifact here (default: a temporary folder)
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 32
    precision: str = "fp32"

    def __post_init__(self):
        if self.train_seconds is not None and not self.train_seconds > 0:
            raise UsageError(f"--train-seconds must be > 0, got {self.train_seconds}")
        steps = self.train_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise UsageError(f"--train-steps must be a positive integer, got {self.train_steps}")
        if self.preset is not None:
            preset(self.preset)  # an unknown name is a ConfigError naming the presets


def train_demo_model(checkpoint: Path, steps: int = TRAIN_STEPS, seconds: float | None = None,
                     echo: Callable[[str], None] = print) -> dict:
    """The demo's byte-level model, trained for `steps` seeded steps on the stdlib's docstrings, published to
    `checkpoint` (weights, config.json, training.json, the byte tokenizer). Returns the training stats."""
    import torch

    from neodeploy.core.files import make_temp_dir, normalise_permissions, publish
    from neodeploy.reference import train as training
    from neodeploy.core.tokenizer import Tokenizer, write_tokenizer_files

    spec = training.byte_model_spec()
    tmp = make_temp_dir(checkpoint, UsageError)
    threads = torch.get_num_threads()
    try:
        write_tokenizer_files(tmp, spec, None)
        tokenizer = Tokenizer.from_dir(tmp)
        data = training.token_stream(tokenizer.encode, training.stdlib_docstrings(1_000_000))
        torch.set_num_threads(TRAIN_THREADS)
        model, stats = training.train(spec, data, steps=steps, seed=TRAIN_SEED, seconds=seconds, lr=TRAIN_LR,
                                      echo=lambda line: echo(" " + line))
        training.save(model, spec, tmp, stats)
        normalise_permissions(tmp)
        publish(tmp, checkpoint)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> bool:
    """Train (or make) a checkpoint, export it, generate, check and validate. True when every gate passed."""
    from neodeploy.export import export
    from neodeploy.reference.checkpoint import make_checkpoint
    from neodeploy.runtime import load
    from neodeploy.runtime.check import run_check
    from neodeploy.runtime.check import check_table
    from neodeploy.validate import validate_table
    from neodeploy.validate import validate

    keep = options.workdir is not None
    workdir = Path(options.workdir) if keep else Path(tempfile.mkdtemp(prefix="neodeploy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    try:
        start = time.perf_counter()
        if options.preset:
            spec = preset(options.preset)
            echo(f"== 1/5 make-checkpoint: random-initialised {options.preset} "
                 f"({human_count(spec.num_parameters())} parameters)")
            make_checkpoint(spec, checkpoint, seed=0, overwrite=True)
        elif options.train_steps is None and options.train_seconds is None:
            stats = json.loads((SHIPPED / "training.json").read_text())
            echo(f"== 1/5 checkpoint: the shipped byte-level GPT-NeoX (pythia-14m architecture, 2 layers), trained by "
                 f"this demo's own code on the standard library's docstrings for {stats['steps']} steps "
                 f"(--train-steps N trains anew)")
            shutil.copytree(SHIPPED, checkpoint, dirs_exist_ok=True)
            echo(f"   held-out loss {stats['held_out_loss']:.2f} (uniform {stats['uniform_loss']:.2f})")
        else:
            steps = options.train_steps or TRAIN_STEPS
            cap = f", at most {options.train_seconds:g} s" if options.train_seconds is not None else ""
            echo(f"== 1/5 train: a byte-level GPT-NeoX (pythia-14m architecture, 2 layers) on the standard library's "
                 f"docstrings for {steps} steps (seed {TRAIN_SEED}{cap})")
            stats = train_demo_model(checkpoint, steps, options.train_seconds, echo)
            echo(f"   held-out loss {stats['held_out_loss']:.2f} (uniform {stats['uniform_loss']:.2f}) after "
                 f"{stats['steps']} steps")
        echo(f"   {checkpoint} written in {time.perf_counter() - start:.1f} s")
        echo(f"== 2/5 export: {checkpoint} -> {artifact} ({options.precision}), verified in onnxruntime against the "
             f"reference")
        export(checkpoint, artifact, precision=options.precision, overwrite=True)
        echo(f"== 3/5 generate: {options.max_new_tokens} tokens from {options.prompt!r} with the runtime (no PyTorch)")
        model = load(artifact)
        greedy = model.generate(options.prompt, max_new_tokens=options.max_new_tokens)[0]
        sampled = model.generate(options.prompt, max_new_tokens=options.max_new_tokens, temperature=0.7, top_k=20,
                                 repetition_penalty=1.2, seed=0)[0]
        echo(f"   prompt ids {greedy.prompt_ids[:12]}{' ...' if len(greedy.prompt_ids) > 12 else ''}")
        echo(f"   greedy     {options.prompt + greedy.text!r}  ({greedy.finish_reason})")
        echo(f"   sampled    {options.prompt + sampled.text!r}  (temperature 0.7, top-k 20, repetition penalty 1.2, "
             f"seed 0)")
        if options.preset:
            echo("   (random weights: the text is noise, and ids beyond the built-in byte tokenizer decode to nothing)")
        echo("== 4/5 check: replay golden.npz with the runtime alone")
        results = run_check(model)
        echo(check_table(results))
        echo("== 5/5 validate: runtime vs the PyTorch reference")
        report = validate(model, checkpoint, steps=16)
        echo(validate_table(report))
        ok = all(r.passed for r in results) and report.passed
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    where = f"checkpoint and artifact kept in {workdir}" if keep else \
        "temporary folder removed (pass --workdir DIR to keep the checkpoint and the artifact)"
    echo(f"demo {'complete' if ok else 'FAILED'}: {where}")
    return ok
