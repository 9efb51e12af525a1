"""The GPU figures of issue 28 in one run: golden replay, validation against the reference on the GPU, prefill and
decode speed against transformers' own fp16 generate, and the server's throughput.

    bash scripts/gpu/measure.sh                      # on the GPU machine (CUDA provider, pythia-410m and pythia-1b)
    python scripts/gpu/measure.py --provider cpu --quick --work /tmp/x   # a dry run here: every code path, tiny models

Every section prints its own table and goes on when one step fails (the failure is printed, and the exit status is 1
at the end): GPU time is short, and one failing step must not cost the figures of the others.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}
FAILURES: list[str] = []


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def attempt(what: str, fn, *args, **kwargs):
    """fn(*args) with its failure printed and counted instead of raised."""
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a report: every failure is printed, none stops the run
        FAILURES.append(what)
        print(f"   FAILED {what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return None
    print(f"   {what}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return result


def environment(device: str) -> str:
    """What ran: onnxruntime build and providers, the GPU, torch; returns the torch device for the peers."""
    import onnxruntime as ort
    import torch

    section("environment")
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels torch brought, where the image has them there
    print(f"   python {platform.python_version()}, onnxruntime {ort.__version__} ({ort.__file__})")
    print(f"   providers: {', '.join(ort.get_available_providers())}")
    print(f"   torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    print(f"   cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if device == "cuda":
        from neodeploy.runtime.gpu import gpu_info

        print(f"   gpu: {gpu_info()}")
    return "cuda" if device == "cuda" else "cpu"


# ----------------------------------------------------------------------------------------------- models


def checkpoint(work: Path, name: str, spec) -> Path:
    from neodeploy.reference import make_checkpoint

    folder = work / "ckpt" / name
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        make_checkpoint(spec, folder, seed=0)
    return folder


def artifact(work: Path, ckpt: Path, precision: str, target: str, max_context: int) -> Path:
    from neodeploy.export import export

    out = work / "art" / f"{ckpt.name}-{precision}-{target}"
    if not (out / "neodeploy.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export(ckpt, out, precision=precision, target=target, max_context=max_context, echo=lambda line: None,
               logits="last" if target != "portable" else None)
    return out


def tiny_specs() -> dict:
    from neodeploy.core.spec import preset

    neox = preset("pythia-70m").replace(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512,
                                        vocab_size=512, attention_layers=("global", "global"))
    neo = preset("gpt-neo-125m").replace(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256,
                                         vocab_size=512, attention_layers=("global", "local"), window_size=8)
    return {"neox-tiny": neox, "neo-tiny": neo}


# ----------------------------------------------------------------------------------------------- sections


def golden_replay(work: Path, providers: list[str]) -> dict:
    """neodeploy check on fp32 / fp16 portable artifacts and the CUDA target, both families, on the provider."""
    from neodeploy.runtime import load
    from neodeploy.runtime.check import run_check

    section(f"check (golden replay) on {providers[0]}")
    arts = {}
    for name, spec in tiny_specs().items():
        ckpt = checkpoint(work, name, spec)
        for precision, target in (("fp32", "portable"), ("fp16", "portable"), ("fp16", "cuda")):
            label = f"{name} {precision} {target}"
            art = attempt(f"export {label}", artifact, work, ckpt, precision, target, 256)
            if art is None:
                continue
            arts[(name, precision, target)] = (ckpt, art)
            model = attempt(f"load {label}", load, art, providers=providers)
            if model is None:
                continue
            results = attempt(f"check {label}", run_check, model) or []
            bad = [r for r in results if not r.passed]
            print(f"   {label}: {len(results) - len(bad)}/{len(results)} golden cases pass"
                  + (f" (drift: {', '.join(r.name for r in bad)})" if bad else ""))
            if bad:
                FAILURES.append(f"check {label}")
    return arts


def validate_on_device(arts: dict, providers: list[str], device: str, steps: int = 16) -> None:
    """The reference (PyTorch, fp32) on the GPU against the runtime, teacher-forced on the reference's greedy tokens:
    the largest logit error relative to the logits' scale, and greedy agreement."""
    import torch

    from neodeploy.reference import load_checkpoint
    from neodeploy.runtime import load

    section(f"validate against the reference on {device}")
    prompt = [5, 17, 33, 2, 250, 9, 100, 64, 3, 7, 11]
    for (name, precision, target), (ckpt, art) in arts.items():
        label = f"{name} {precision} {target}"

        def one():
            reference = load_checkpoint(ckpt).to(device)
            model = load(art, providers=providers)
            with torch.inference_mode():
                ids = torch.tensor([prompt], device=device)
                logits, past = reference(ids)
                want, tokens = [logits[0, -1].float().cpu().numpy()], []
                for _ in range(steps - 1):
                    tokens.append(int(want[-1].argmax()))
                    logits, past = reference(torch.tensor([[tokens[-1]]], device=device), past_key_values=past)
                    want.append(logits[0, -1].float().cpu().numpy())
            got = _runtime_logits(model, prompt, tokens)
            want = np.stack(want)
            error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
            agree = int((got.argmax(-1) == want.argmax(-1)).sum())
            print(f"   {label}: max |Δlogit| / max |logit| = {error:.2e}, greedy agrees {agree}/{steps}")
        attempt(f"validate {label}", one)


def _runtime_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    from neodeploy.runtime.batch import DecodeBatch

    batch = DecodeBatch(model.backend)
    out = [batch.prefill([prompt], model.pad_token_id, len(prompt) + len(tokens) + 1)[0]]
    for token in tokens:
        out.append(batch.step(np.array([token]))[0])
    return np.stack(out)


def speed(work: Path, presets: list[str], providers: list[str], device: str, prompt_len: int, steps: int,
          target: str) -> None:
    """Prefill ms and decode ms/token at batch 1 and 8: ours (fp16, the provider) against transformers' own fp16
    generate on the same device, random weights."""
    section(f"speed: prefill {prompt_len} tokens, decode {steps} tokens, fp16, {providers[0]} vs transformers")
    print(f"   {'model':<14} {'batch':>5} {'ours prefill ms':>16} {'ours decode ms/tok':>19} "
          f"{'hf prefill ms':>14} {'hf decode ms/tok':>17}")
    from neodeploy.core.spec import preset

    for name in presets:
        ckpt = checkpoint(work, name, preset(name))
        art = attempt(f"export {name} fp16 {target}", artifact, work, ckpt, "fp16", target, prompt_len + steps + 8)
        for batch in (1, 8):
            ours = attempt(f"ours {name} b{batch}", _time_ours, art, providers, batch, prompt_len, steps) if art else None
            peer = attempt(f"transformers {name} b{batch}", _time_transformers, ckpt, device, batch, prompt_len, steps)
            cell = lambda pair, i: f"{pair[i]:.2f}" if pair else "-"  # noqa: E731
            print(f"   {name:<14} {batch:>5} {cell(ours, 0):>16} {cell(ours, 1):>19} {cell(peer, 0):>14} "
                  f"{cell(peer, 1):>17}", flush=True)


def _prompts(batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, length))


def _time_ours(art: Path, providers: list[str], batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    from neodeploy.runtime import load
    from neodeploy.runtime.batch import DecodeBatch

    model = load(art, providers=providers)
    prompts = _prompts(batch, prompt_len, model.vocab_size).tolist()
    for _ in range(2):  # the first run pays for kernel selection and allocation
        run = DecodeBatch(model.backend)
        t0 = time.perf_counter()
        logits = run.prefill(prompts, model.pad_token_id, prompt_len + steps + 1)
        t1 = time.perf_counter()
        for _ in range(steps):
            logits = run.step(logits.argmax(-1))
        t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps


def _time_transformers(ckpt: Path, device: str, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    ids = torch.from_numpy(_prompts(batch, prompt_len, model.config.vocab_size)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            model(ids)
            sync()
            t1 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                           do_sample=False, pad_token_id=0)
            sync()
            t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill * 1e3, ((t2 - t1) - prefill) * 1e3 / steps


def serving(work: Path, name: str, target: str, concurrency: str, requests: int, prompt_len: int,
            new_tokens: int) -> None:
    """neodeploy bench-serve (its server uses the first available provider: CUDA where onnxruntime-gpu is installed)."""
    from neodeploy.core.spec import preset

    section(f"bench-serve {name} fp16 {target} at {concurrency} clients")
    ckpt = checkpoint(work, name, preset(name))
    art = attempt(f"export {name} fp16 {target}", artifact, work, ckpt, "fp16", target, prompt_len + new_tokens + 8)
    if art is None:
        return
    if target == "cuda" and not _has_cuda():  # the dry run: the server loads with the default providers, and refuses
        print("   skipped: a --target cuda artifact serves only where onnxruntime has CUDAExecutionProvider")
        return
    command = [sys.executable, "-m", "neodeploy", "bench-serve", str(art), "--concurrency", concurrency,
               "--requests", str(requests), "--prompt", str(prompt_len), "--new-tokens", str(new_tokens),
               "--json", str(work / f"bench-serve-{name}.json")]
    print("   " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        FAILURES.append(f"bench-serve {name}")


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", choices=list(PROVIDERS), default="cuda")
    p.add_argument("--work", default=os.environ.get("NEODEPLOY_GPU_WORK", "/tmp/neodeploy-gpu-work"))
    p.add_argument("--quick", action="store_true", help="tiny presets and short runs: the dry run of every code path")
    p.add_argument("--only", default="check,validate,speed,serve", help="sections to run, comma-separated")
    p.add_argument("--target", default="cuda", help="the export target timed and served: cuda (default: fp16 "
                   "GroupQueryAttention, docs/gpu.md) or portable")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    providers = PROVIDERS[args.provider]
    device = environment(args.provider)
    presets = ["pythia-14m"] if args.quick else ["pythia-410m", "pythia-1b"]
    if "check" in only or "validate" in only:
        arts = golden_replay(work, providers)
        if "validate" in only:
            validate_on_device(arts, providers, device, steps=4 if args.quick else 16)
    if "speed" in only:
        speed(work, presets, providers, device, prompt_len=16 if args.quick else 128, steps=4 if args.quick else 64,
              target=args.target)
    if "serve" in only:
        serving(work, presets[0], args.target, "2" if args.quick else "8,32", 4 if args.quick else 64,
                16 if args.quick else 128, 8 if args.quick else 64)
    section("summary")
    print(f"   {len(FAILURES)} failed step(s)" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
