"""The `neodeploy` command. Every NeodeployError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from neodeploy import __version__
from neodeploy.core.errors import NeodeployError, UsageError
from neodeploy.demo import DemoOptions, run_demo
from neodeploy.export import memory as export_memory
from neodeploy.export.options import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportOptions
from neodeploy.runtime.backend import BACKENDS
from neodeploy.runtime.engine import EngineConfig
from neodeploy.runtime.sampling import SamplingParams
from neodeploy.serve.options import ServeOptions
from neodeploy.core.spec import PRESETS, ModelSpec, human_bytes, human_count, load_spec, preset
from neodeploy.core.tokenizer import chat_template_option

# Which extra brings which top-level module (pyproject.toml's optional dependencies).
EXTRAS = {
    "export": ("torch", "onnx", "onnxscript", "onnxslim", "safetensors", "onnx_ir"),
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client", "jinja2", "httpx", "llguidance"),
    "ray": ("ray",),
    "trt": ("tensorrt", "polygraphy", "onnx_graphsurgeon"),
    "dev": ("transformers", "optimum", "matplotlib"),
}

# make-checkpoint overrides: flag -> ModelSpec field
OVERRIDES = {
    "layers": "num_layers",
    "hidden": "hidden_size",
    "heads": "num_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
    "max_positions": "max_positions",
    "window": "window_size",
    "rotary_pct": "rotary_pct",
}


def _spec_with_overrides(args: argparse.Namespace) -> ModelSpec:
    spec = preset(args.preset)
    changes = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    if "hidden_size" in changes and "intermediate_size" not in changes:
        changes["intermediate_size"] = 4 * changes["hidden_size"]
    if "window_size" in changes and spec.family != "gpt_neo":
        raise UsageError("--window applies to GPT-Neo presets only")
    if "rotary_pct" in changes and spec.family != "gpt_neox":
        raise UsageError("--rotary-pct applies to GPT-NeoX presets only")
    return spec.replace(**changes) if changes else spec


def _sizes_table(spec: ModelSpec) -> list[tuple[str, str]]:
    n = spec.num_parameters()
    kv_per_token = spec.kv_values_per_token
    rows = [
        ("family", spec.family),
        ("layers / hidden / heads / head dim", f"{spec.num_layers} / {spec.hidden_size} / {spec.num_heads} / {spec.head_dim}"),
        ("intermediate / vocab / max positions", f"{spec.intermediate_size} / {spec.vocab_size} / {spec.max_positions}"),
        ("activation / layer-norm eps", f"{spec.activation} / {spec.layer_norm_eps:g}"),
    ]
    if spec.family == "gpt_neo":
        local = sum(k == "local" for k in spec.attention_layers)
        rows.append(("attention", f"{spec.num_layers - local} global, {local} local (window {spec.window_size})"))
    else:
        scaling = f", {spec.rope_scaling_type} x{spec.rope_scaling_factor:g}" if spec.rope_scaling_type else ""
        rows.append(("rotary", f"{spec.rotary_dims} of {spec.head_dim} dims, base {spec.rotary_base:g}{scaling}"))
        rows.append(("residual", "parallel" if spec.parallel_residual else "sequential"))
    rows += [
        ("tied embeddings", str(spec.tied_embeddings)),
        ("parameters", f"{human_count(n)} ({n:,})"),
        ("weights fp32 / fp16", f"{human_bytes(4 * n)} / {human_bytes(2 * n)}"),
        ("export memory (peak, any target)", f"{human_bytes(export_memory.need(spec))} (1.5 x fp32 weights + 1.5 GB)"),
        ("KV cache per token fp32 / fp16", f"{human_bytes(4 * kv_per_token)} / {human_bytes(2 * kv_per_token)}"),
        (
            f"KV cache at {spec.max_positions} tokens, fp16",
            human_bytes(2 * kv_per_token * spec.max_positions),
        ),
    ]
    return rows


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


# --------------------------------------------------------------------------------------------- commands

def cmd_presets(args: argparse.Namespace) -> int:
    print(f"{'preset':<14} {'family':<9} {'layers':>6} {'hidden':>6} {'heads':>5} {'params':>8} {'fp32':>10} {'fp16':>10} "
          f"{'export mem':>10}")
    for name, spec in PRESETS.items():
        n = spec.num_parameters()
        print(
            f"{name:<14} {spec.family:<9} {spec.num_layers:>6} {spec.hidden_size:>6} {spec.num_heads:>5} "
            f"{human_count(n):>8} {human_bytes(4 * n):>10} {human_bytes(2 * n):>10} "
            f"{human_bytes(export_memory.need(spec)):>10}"
        )
    return 0


def _chat_template_row(manifest) -> str:
    from neodeploy.core.tokenizer import chat_template_source

    source = chat_template_source(manifest.folder)
    return (f"yes ({source})" if source else
            "none: /v1/chat/completions answers 400 (export --chat-template FILE|chatml, or serve --chat-template)")


def _artifact_rows(manifest) -> list[tuple[str, str]]:
    onnx, quant, data = manifest.onnx, manifest.quantization, manifest.data
    size = sum((manifest.folder / n).stat().st_size for n in manifest.files if (manifest.folder / n).is_file())
    rows = [("dtype", manifest.dtype),
            ("quantisation", f"{quant.method} ({quant.ops or ''})" if quant else "none"),
            ("target", onnx.target),
            ("KV cache", onnx.kv_cache + (f", rotary in the {onnx.rotary}" if onnx.kv_cache == "in-place" else "")),
            ("logits", {"last": "last position", "tail": "last position (last n on request)"}.get(onnx.logits, "all positions")),
            ("max context", str(manifest.max_context)),
            ("KV cache / token", human_bytes(manifest.kv_bytes_per_token)),
            ("opset", str(onnx.opset)),
            ("files", f"{len(manifest.files)}, {human_bytes(size)}"),
            ("chat template", _chat_template_row(manifest))]
    verification = data.get("verification") or {}
    cases = [c for c in verification.get("cases") or [] if isinstance(c, dict)]
    if cases:
        worst = max(c.get("max_abs_error", 0) / (c.get("scale") or 1) for c in cases)
        agree = sum(c.get("greedy_agree", 0) for c in cases), sum(c.get("greedy_total", 0) for c in cases)
        rows.append(("verification at export", f"{len(cases)} golden cases, max |Δlogit| {worst:.2g} x logit scale "
                     f"(bound {verification.get('tolerance_relative')}), greedy {agree[0]}/{agree[1]}"))
    if onnx.fused:
        rows.append(("fused ops", ", ".join(f"{op} x{n}" for op, n in onnx.fused.items())))
    if isinstance(data.get("stage_seconds"), dict):
        rows.append(("export stages", ", ".join(f"{k} {v:g} s" for k, v in data["stage_seconds"].items())))
    engine = manifest.engine
    if engine:
        gpu = engine.get("gpu") if isinstance(engine.get("gpu"), dict) else {}
        profile = engine.get("profile") if isinstance(engine.get("profile"), dict) else {}
        rows.append(("TensorRT engine", f"TensorRT {engine['tensorrt_version']} for {gpu.get('name', '?')} "
                                        f"(profile {profile.get('name', '?')})"))
    else:
        rows.append(("TensorRT engine", "none (neodeploy build-engine)"))
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.preset is None):
        raise UsageError("give either a CHECKPOINT folder or --preset NAME")
    if args.checkpoint and (Path(args.checkpoint) / "neodeploy.json").is_file():  # an artifact: what its manifest knows
        from neodeploy.core.manifest import read_manifest

        manifest = read_manifest(args.checkpoint)
        spec = manifest.spec
        if args.json:
            print(json.dumps({**manifest.data, "precision": manifest.precision,
                              "num_parameters": spec.num_parameters()}, indent=2))
            return 0
        print(f"{args.checkpoint} (neodeploy artifact):")
        _print_rows(_artifact_rows(manifest) + _sizes_table(spec))
        return 0
    spec = preset(args.preset) if args.preset else load_spec(args.checkpoint)
    if args.json:
        print(json.dumps({**spec.to_dict(), "num_parameters": spec.num_parameters()}, indent=2))
        return 0
    print(f"{args.preset or args.checkpoint}:")
    _print_rows(_sizes_table(spec))
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from neodeploy.reference.checkpoint import make_checkpoint

    import math

    if not (math.isfinite(args.max_shard_size) and args.max_shard_size * 1e9 >= 1 << 20):
        raise UsageError(f"--max-shard-size must be at least 0.001 GB (1 MB), got {args.max_shard_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    spec = _spec_with_overrides(args)
    n = spec.num_parameters()
    print(f"writing a random-initialised {args.preset} ({human_count(n)} parameters, {args.dtype}) to {args.out} ...")
    start = time.perf_counter()
    out = make_checkpoint(
        spec, args.out, seed=args.seed, dtype=args.dtype, tokenizer_dir=args.tokenizer, overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_size * 1e9), file_format=args.format,
    )
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"done in {time.perf_counter() - start:.1f} s: {human_bytes(size)} in {', '.join(files)}")
    if not any(name.startswith(("tokenizer", "vocab")) for name in files):
        print("note: no tokenizer written (vocabulary under 257 tokens and no --tokenizer given)")
    return 0


def _run_reference(checkpoint: Path, prompt: str | None, ids: list[int] | None, max_new_tokens: int, dtype: str) -> dict:
    from neodeploy.reference.checkpoint import load_checkpoint
    from neodeploy.reference.generate import greedy_generate
    from neodeploy.core.tokenizer import Tokenizer

    start = time.perf_counter()
    model = load_checkpoint(checkpoint, dtype=dtype)
    load_s = time.perf_counter() - start
    tokenizer = None
    if ids is None:
        tokenizer = Tokenizer.from_dir(checkpoint)
        ids = tokenizer.encode(prompt)
    eos = tokenizer.eos_token_id if tokenizer else model.spec.eos_token_id
    result = greedy_generate(model, ids, max_new_tokens, eos_token_id=eos)
    text = tokenizer.decode(result.output_ids) if tokenizer else None
    steps = max(len(result.output_ids) - 1, 1)
    return {
        "checkpoint": str(checkpoint),
        "prompt": prompt,
        "prompt_ids": result.prompt_ids,
        "output_ids": result.output_ids,
        "text": text,
        "load_s": round(load_s, 3),
        "prefill_ms": round(1e3 * result.prefill_s, 2),
        "decode_ms_per_token": round(1e3 * result.decode_s / steps, 2),
    }


def _print_reference(r: dict) -> None:
    print(f"  prompt        {r['prompt']!r} -> {len(r['prompt_ids'])} tokens {r['prompt_ids'][:12]}")
    print(f"  greedy ids    {r['output_ids']}")
    if r["text"] is not None:
        print(f"  greedy text   {r['text']!r}")
    print(f"  load {r['load_s']:.2f} s · prefill {r['prefill_ms']:.1f} ms · decode {r['decode_ms_per_token']:.1f} ms/token")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise UsageError(f"--ids expects integers separated by spaces or commas, got {text!r}") from exc


def cmd_reference(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.ids is None):
        raise UsageError("give either a PROMPT or --ids")
    ids = _parse_ids(args.ids) if args.ids is not None else None
    result = _run_reference(Path(args.checkpoint), args.prompt, ids, args.max_new_tokens, args.dtype)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"reference ({args.dtype}) on {args.checkpoint}:")
        _print_reference(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from neodeploy.export import export

    int4 = {name: value for name, value in (("block_size", args.block_size), ("head_bits", args.head_bits))
            if value is not None}  # what the user gave; ExportOptions' defaults for the rest
    if int4 and args.quantize != "int4":
        flag = "--" + next(iter(int4)).replace("_", "-")
        raise UsageError(f"{flag} applies to --quantize int4 only; drop it or add --quantize int4")
    options = ExportOptions(precision=args.precision, opset=args.opset, max_context=args.max_context,
                            overwrite=args.overwrite, quantize=args.quantize, target=args.target, logits=args.logits,
                            reuse_reference=not args.no_reference_cache, max_memory=args.max_memory, **int4,
                            chat_template=chat_template_option(args.chat_template) if args.chat_template else None)
    export(args.checkpoint, args.out_dir, options)
    return 0


def _read_prompts(items: list[str]) -> list[str]:
    prompts: list[str] = []
    for item in items:
        if item == "-":
            try:
                prompts.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
            except UnicodeDecodeError as exc:
                raise UsageError(f"stdin is not UTF-8 text (byte {exc.start} of a line); pass UTF-8 prompts") from exc
        else:
            prompts.append(item)
    if not prompts:
        raise UsageError("no prompts given (pass PROMPT arguments, or - to read one prompt per line from stdin)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from neodeploy.runtime import load

    model = load(args.artifact, backend=args.backend, speculate=args.speculate, speculate_tokens=args.speculate_tokens)
    prompts = _read_prompts(args.prompt)
    ids_mode = args.ids
    inputs = [_parse_ids(p) for p in prompts] if ids_mode else prompts
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   stop=[*args.stop, *args.stop_id], min_p=args.min_p, frequency_penalty=args.frequency_penalty,
                   presence_penalty=args.presence_penalty, logit_bias=_logit_bias(args.logit_bias),
                   response_format=_response_format(args))
    if args.stream:
        if len(inputs) != 1 or args.json:
            raise UsageError("--stream takes exactly one prompt and no --json")
        for piece in model.stream(inputs[0], **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for row, (prompt, result) in enumerate(zip(prompts, model.generate(inputs, **options)), 1):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                              "text": result.text, "finish_reason": result.finish_reason}, ensure_ascii=False))
        elif len(prompts) == 1:
            print(result.text if model.tokenizer else " ".join(map(str, result.output_ids)))
        else:  # several rows: a labelled block each, so a newline inside one output cannot blur the rows
            body = result.text if model.tokenizer else " ".join(map(str, result.output_ids))
            print(f"--- [{row}/{len(prompts)}] {prompt!r} ({result.finish_reason})")
            print(body)
    return 0


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise UsageError(f"--logit-bias takes ID=BIAS (e.g. 50256=-100), got {pair!r}") from None
    return bias


def _response_format(args: argparse.Namespace) -> dict | None:
    given = [(name, value) for name, value in (("json_schema", args.json_schema), ("regex", args.regex),
                                               ("grammar", args.grammar)) if value is not None]
    if len(given) > 1:
        raise UsageError("give one of --json-schema, --regex and --grammar")
    if not given:
        return None
    kind, value = given[0]
    if kind == "regex":
        return {"type": "regex", "regex": value}
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --{kind.replace('_', '-')} {value}: {exc}") from exc
    if kind == "grammar":
        return {"type": "grammar", "grammar": text}
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--json-schema {value} is not JSON: {exc}") from exc
    return {"type": "json_schema", "json_schema": {"name": Path(value).stem, "schema": schema}}


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from neodeploy.serve import run
    except ImportError as exc:
        raise UsageError(f"neodeploy serve needs the serve extra ({exc.name} is missing): pip install 'neodeploy[serve]'") from exc
    from neodeploy.core.manifest import read_manifest
    from neodeploy.runtime.engine import parse_kv_budget

    manifest = read_manifest(args.artifact)  # a wrong path fails here, in one line, before the server starts
    # Parsed once, here, into tokens (a bad size fails before the server starts); the engine takes the count.
    kv_budget = parse_kv_budget(args.kv_budget, manifest)
    config = EngineConfig(max_running=args.max_running, max_waiting=args.max_waiting, kv_budget=kv_budget,
                          prefill_chunk=args.prefill_chunk, busy_prefill_chunk=args.busy_prefill_chunk,
                          regroup_wait=args.regroup_wait, prefix_cache=0 if args.no_prefix_cache else args.prefix_cache,
                          speculate=args.speculate, speculate_tokens=args.speculate_tokens)
    options = ServeOptions(Path(args.artifact), args.model_name,
                           args.api_key or os.environ.get("NEODEPLOY_API_KEY") or None, config, args.skip_check,
                           args.backend, args.grace_period, host=args.host, port=args.port,
                           allowed_hosts=tuple(args.allowed_hosts.split(",")) if args.allowed_hosts else None,
                           cors_origins=tuple(o for o in (args.cors_origin or []) if o),
                           header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                           max_connections=args.max_connections,  # checks the numbers, with the option's name
                           chat_template=chat_template_option(args.chat_template) if args.chat_template else None,
                           ui=not args.no_ui)
    if args.ray:
        from neodeploy.serve import ray as ray_serve

        scaling = ray_serve.Scaling(args.replicas, ray_serve.parse_autoscale(args.autoscale), args.cpus_per_replica)
        return ray_serve.run(options, scaling, args.address)
    if args.replicas is not None or args.autoscale or args.address or args.cpus_per_replica:
        raise UsageError("--replicas, --autoscale, --address and --cpus-per-replica need --ray")
    return run(options)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    try:
        from neodeploy.serve import throughput
    except ImportError as exc:
        raise UsageError(f"bench-serve needs the serve extra ({exc.name} is missing): pip install 'neodeploy[serve]'") from exc
    concurrency = _int_list(args.concurrency)
    report = throughput.bench_serve(args.artifact, args.url, args.model_name, args.api_key, concurrency, args.requests,
                                    args.prompt, args.new_tokens, not args.no_baseline, args.max_running,
                                    workload=args.workload, prefix_len=args.prefix, compare=tuple(args.compare))
    print(throughput.throughput_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        throughput.plot(report, Path(args.plot))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from neodeploy.runtime import load
    from neodeploy.runtime.check import check_table, run_check, write_junit, write_report

    model = load(args.artifact, backend=args.backend)
    results = run_check(model)
    print(f"check {args.artifact} ({model.backend.name}, {model.manifest.precision}) against golden.npz:")
    print(check_table(results))
    if args.report:
        write_report(Path(args.report), model, results)
    if args.junit:
        write_junit(Path(args.junit), model, results)
    passed = all(r.passed for r in results)
    print("check passed" if passed else "check FAILED")
    return 0 if passed else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from neodeploy.runtime import load
    from neodeploy.validate import validate, validate_table, write_report

    model = load(args.artifact, backend=args.backend)
    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UsageError(f"prompts file {path} does not exist")
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"prompts file {path} is not UTF-8 text (byte {exc.start}); pass UTF-8 prompts") from exc
        if not prompts:
            raise UsageError(f"prompts file {path} has no non-empty lines")
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    report = validate(model, args.reference, prompts=prompts, steps=args.steps, layerwise=args.layerwise)
    print(f"validate {args.artifact} ({model.backend.name}, {report.precision}) against the reference {args.reference}:")
    print(validate_table(report))
    if args.report:
        write_report(Path(args.report), report)
    return 0 if report.passed else 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    from neodeploy.export.tensorrt import build_engine

    build_engine(args.artifact, args.profile, timing_cache=args.timing_cache, opt_level=args.opt_level,
                 workspace_gib=args.workspace)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from exc


def cmd_bench(args: argparse.Namespace) -> int:
    from neodeploy.speed import bench, plot, speed_table, write_json

    compare = [s.strip() for s in args.compare.split(",") if s.strip()] if args.compare is not None else None
    report = bench(args.artifact, checkpoint=args.checkpoint, compare=compare, batches=_int_list(args.batch),
                   prompt=args.prompt, new_tokens=args.new_tokens, repeat=args.repeat, gguf=args.gguf,
                   threads=args.threads)
    print(speed_table(report))
    if args.json:
        write_json(Path(args.json), report)
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from neodeploy.export.lint import lint, lint_table
    from neodeploy.profiles import ProfileError, load_profile, shipped
    from neodeploy.core.manifest import read_manifest

    from neodeploy.core.manifest import verify_files

    manifest = read_manifest(args.artifact)
    verify_files(manifest)  # a corrupt or truncated graph is one line, as in load
    if manifest.onnx.target in ("cpu", "cuda") or manifest.quantization:
        what = f"a --target {manifest.onnx.target} export" if manifest.onnx.target != "portable" else "a quantised export"
        print(f"lint {args.artifact}: FAIL  this is {what} (onnxruntime-only ops); TensorRT builds from a portable fp16 "
              "export: neodeploy export CHECKPOINT OUT --precision fp16")
        return 1
    names = [args.profile] if args.profile else shipped()
    passed = True
    for k, name in enumerate(names):
        profile = load_profile(name)
        try:
            results = lint(Path(args.artifact), manifest, profile, run_polygraphy=k == 0 and not args.no_polygraphy)
        except ProfileError as exc:
            if args.profile:
                raise
            print(f"lint {args.artifact}, profile {profile.name!r}: FAIL  {exc}")
            passed = False
            continue
        print(f"lint {args.artifact} ({manifest.precision}) for TensorRT, profile {profile.name!r} ({profile.description}):")
        print(lint_table(results))
        passed &= all(r.passed for r in results)
    print("lint passed" if passed else "lint FAILED")
    return 0 if passed else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on a built-in default: no network, no user files (neodeploy.demo)."""
    options = DemoOptions(preset=args.preset, train_steps=args.train_steps, train_seconds=args.train_seconds,
                          workdir=Path(args.workdir) if args.workdir is not None else None, prompt=args.prompt,
                          max_new_tokens=args.max_new_tokens, precision=args.precision)
    return 0 if run_demo(options) else 1


# --------------------------------------------------------------------------------------------- parser

class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help already names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False and default != []
                and default is not argparse.SUPPRESS and "default" not in text):
            text += f" (default: {action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2, like ours
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Options several commands take, defined once (argparse parents)."""
    quiet, backend, speculate = (_Parser(add_help=False) for _ in range(3))
    quiet.add_argument("--quiet", action="store_true", help="no live progress line (also off when stderr is not a terminal)")
    backend.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime")
    speculate.add_argument("--speculate", metavar="ngram|DRAFT", help="speculative decoding while a request decodes "
                           "alone: ngram (prompt lookup) or a draft artifact sharing the tokenizer (exact: the same "
                           "output as without)")
    speculate.add_argument("--speculate-tokens", type=int, default=EngineConfig.speculate_tokens,
                           metavar="K", help=f"tokens drafted per step (default {EngineConfig.speculate_tokens})")
    return {"quiet": quiet, "backend": backend, "speculate": speculate}


def build_parser() -> argparse.ArgumentParser:
    shared = _shared_options()
    quiet, backend, speculate = shared["quiet"], shared["backend"], shared["speculate"]
    parser = _Parser(prog="neodeploy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"neodeploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_presets(sub)
    _add_inspect(sub)
    _add_make_checkpoint(sub, quiet)
    _add_reference(sub)
    _add_export(sub, quiet)
    _add_generate(sub, backend, speculate)
    _add_serve(sub, backend, speculate)
    _add_bench_serve(sub)
    _add_check(sub, backend)
    _add_validate(sub, quiet, backend)
    _add_build_engine(sub)
    _add_bench(sub)
    _add_lint(sub)
    _add_demo(sub, quiet)
    return parser


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the built-in published architectures with their sizes")
    p.set_defaults(func=cmd_presets)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show the normalised ModelSpec and the memory a model needs (or an artifact's manifest)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder with config.json, or an artifact folder")
    p.add_argument("--preset", help="a preset name instead of a folder")
    p.add_argument("--json", action="store_true", help="print the ModelSpec as JSON")
    p.set_defaults(func=cmd_inspect)


def _add_make_checkpoint(sub, quiet: argparse.ArgumentParser) -> None:
    p = sub.add_parser("make-checkpoint", parents=[quiet], help="write a random-initialised checkpoint in Hugging Face layout")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("out", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the weights are stored in")
    p.add_argument("--tokenizer", help="folder with tokenizer files to copy (default: a built-in byte tokenizer)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"], help="weight file format")
    p.add_argument("--max-shard-size", type=float, default=2.0, metavar="GB", help="shard above this size (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    for flag, field in OVERRIDES.items():
        kind = float if field == "rotary_pct" else int
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=f"override {field}")
    p.set_defaults(func=cmd_make_checkpoint)


def _add_reference(sub) -> None:
    p = sub.add_parser("reference", help="greedy-generate with the PyTorch reference model")
    p.add_argument("checkpoint")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--ids", help="prompt as token ids instead of text, e.g. '1 2 3'")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to generate")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype the reference runs in (auto: the file's)")
    p.add_argument("--json", action="store_true", help="print ids and text as JSON")
    p.set_defaults(func=cmd_reference)


def _add_export(sub, quiet: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[quiet], help="export a checkpoint to a verified ONNX artifact folder (KV-cache I/O)")
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder (config.json + weights)")
    p.add_argument("out_dir", help="artifact folder to create")
    p.add_argument("--precision", default=ExportOptions.precision, help="fp32 (default) or fp16 (with fp32 islands)")
    p.add_argument("--opset", type=int, default=ExportOptions.opset,
                   help=f"ONNX opset, {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    p.add_argument("--max-context", type=int, help="longest prompt + generation the artifact serves "
                   "(default: the model's max positions)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quantize", choices=None, help="int8 (dynamic int8 MatMul) or int4 (MatMulNBits) weights, for CPU")
    p.add_argument("--block-size", type=int, help="int4 block size of the layers: 32, 64 (default) or 128")
    p.add_argument("--head-bits", type=int, help="int4's lm_head: 8 (default, 8-bit) or 4")
    p.add_argument("--target", default=ExportOptions.target, help="portable (default: TensorRT, Optimum, any runtime), cpu "
                   "(onnxruntime fusions, last-position logits only) or cuda (fp16, onnxruntime's CUDA "
                   "GroupQueryAttention, rows left-aligned in the cache: docs/gpu.md)")
    p.add_argument("--logits", help="all (portable default: every position, for score and perplexity) or last "
                   "(the last position only, all generation reads; always so for --target cpu)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory the export may use (e.g. 32GB), instead of what "
                   "/proc/meminfo and the cgroup say is available; the export refuses up front if it needs more")
    p.add_argument("--chat-template", metavar="FILE|chatml", help="a Jinja chat template to ship in the artifact "
                   "(chat_template.jinja), or chatml for the built-in one (default: the checkpoint's, if any)")
    p.add_argument("--no-reference-cache", action="store_true", help="recompute the reference stage instead of "
                   "reusing it from an earlier export of the same checkpoint ($NEODEPLOY_CACHE/reference)")
    p.set_defaults(func=cmd_export)


def _add_generate(sub, backend: argparse.ArgumentParser, speculate: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[backend, speculate], help="generate text with an exported artifact (no PyTorch needed)")
    p.add_argument("artifact")
    p.add_argument("prompt", nargs="+", help="prompts (several run as one batch); - reads one per line from stdin")
    p.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=SamplingParams.temperature, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=SamplingParams.top_k, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=SamplingParams.top_p, help="sample from the smallest set of tokens reaching this mass")
    p.add_argument("--repetition-penalty", type=float, default=SamplingParams.repetition_penalty, help="transformers' repetition penalty (1: off)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: unseeded)")
    p.add_argument("--min-p", type=float, default=SamplingParams.min_p, help="drop tokens below this share of the likeliest (0: off)")
    p.add_argument("--frequency-penalty", type=float, default=SamplingParams.frequency_penalty, help="OpenAI's, in [-2, 2] (0: off)")
    p.add_argument("--presence-penalty", type=float, default=SamplingParams.presence_penalty, help="OpenAI's, in [-2, 2] (0: off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS", help="add BIAS in [-100, 100] to "
                   "token ID's logit (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this schema")
    p.add_argument("--regex", help="constrain the output to this regular expression")
    p.add_argument("--grammar", metavar="FILE", help="constrain the output to this Lark grammar")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id (repeatable)")
    p.add_argument("--ids", action="store_true", help="prompts are token ids ('1 2 3'), not text")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.set_defaults(func=cmd_generate)


def _add_serve(sub, backend: argparse.ArgumentParser, speculate: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[speculate, backend], help="serve an artifact over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("artifact")
    p.add_argument("--host", default=ServeOptions.host, help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=ServeOptions.port, help="TCP port")
    p.add_argument("--max-running", type=int, default=EngineConfig.max_running, help="sequences decoded together (default 8)")
    p.add_argument("--max-waiting", type=int, default=EngineConfig.max_waiting, help="queued requests before 429 (default 64)")
    p.add_argument("--kv-budget", help="KV cache over all running slots: tokens (16384) or bytes (512MiB, 2GB); "
                   "default max_context per slot")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk, help="prompt tokens per prefill call while "
                   "nothing decodes or a wave of arrivals is prefilled, several prompts together counted with their "
                   "padding (default %(default)s)")
    p.add_argument("--busy-prefill-chunk", type=int, default=EngineConfig.busy_prefill_chunk, help="prompt tokens prefilled per step while others "
                   "decode (default 64); smaller keeps their token gaps even, larger gives newcomers their first token "
                   "and the batch its throughput sooner")
    p.add_argument("--regroup-wait", type=float, default=EngineConfig.regroup_wait, metavar="SECONDS",
                   help="after several requests end at once, wait up to this long for their clients' next requests "
                   "so those start together and decode in step (default %(default)s; 0: never wait)")
    p.add_argument("--prefix-cache", default=EngineConfig.prefix_cache, metavar="SIZE", help="memory for reusing the KV of shared prompt "
                   "prefixes (512MiB, 2GB; default auto: as much as the running slots' KV cache, at most 1 GiB and a "
                   "tenth of this machine's memory; the server allocates and touches it before it reports ready)")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn the prefix cache off")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set NEODEPLOY_API_KEY)")
    p.add_argument("--model-name", help="the model id clients send (default: the artifact folder's name)")
    p.add_argument("--skip-check", action="store_true", help="serve without replaying golden.npz first")
    p.add_argument("--grace-period", type=float, default=ServeOptions.grace_period, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--allowed-hosts", help="comma-separated Host names served (default: loopback names when bound to "
                   "loopback, any otherwise)")
    p.add_argument("--cors-origin", action="append", help="a browser origin allowed to call the API (repeatable; "
                   "default: none, CORS off)")
    p.add_argument("--header-timeout", type=float, default=ServeOptions.header_timeout, help="seconds to send a request's headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=ServeOptions.body_timeout, help="seconds to send a request's body (default 30)")
    p.add_argument("--max-connections", type=int, default=ServeOptions.max_connections, help="open connections before 503 (default 1024)")
    p.add_argument("--chat-template", metavar="FILE|chatml", help="the chat template to serve, instead of the "
                   "artifact's (chatml: the built-in one)")
    p.add_argument("--no-ui", action="store_true", help="no playground page at GET / (default: served)")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas each run their own engine")
    p.add_argument("--replicas", type=int, help="with --ray: replicas across the cluster (default 1)")
    p.add_argument("--autoscale", help="with --ray: MIN:MAX replicas, scaled on ongoing requests per replica")
    p.add_argument("--address", help="with --ray: join this cluster (default: start a local Ray on 127.0.0.1)")
    p.add_argument("--cpus-per-replica", type=float, help="with --ray: CPUs (and onnxruntime threads) per replica "
                   "(default: this machine's cores / replicas)")
    p.set_defaults(func=cmd_serve)


def _add_bench_serve(sub) -> None:
    p = sub.add_parser("bench-serve", help="throughput and latency of a server at several concurrencies vs Model.generate")
    p.add_argument("artifact", nargs="?", help="serve this artifact here (and run the in-process baseline on it)")
    p.add_argument("--url", help="an OpenAI-compatible server to measure instead (llama.cpp's server, another peer)")
    p.add_argument("--model-name", help="the model id to send with --url (default: the first of /v1/models)")
    p.add_argument("--api-key", help="the key for --url")
    p.add_argument("--concurrency", default="1,4,8,16", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens (each request's own, with "
                   "--workload shared-prefix)")
    p.add_argument("--workload", default="random", choices=["random", "shared-prefix"], help="random prompts, or "
                   "one shared prefix (--prefix tokens) before each request's own --prompt tokens")
    p.add_argument("--prefix", type=int, default=512, help="the shared prefix's length (default 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per request")
    p.add_argument("--max-running", type=int, help="the started server's --max-running (default: the top concurrency)")
    p.add_argument("--no-baseline", action="store_true", help="skip the Model.generate threads baseline")
    p.add_argument("--compare", action="append", default=[], choices=["vllm"], help="also measure vLLM's CPU server "
                   "on the artifact's checkpoint, alternating with ours (set up once with shared/tools/"
                   "vllm-cpu-peer.sh; skipped, saying why, where it is not)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG chart here")
    p.set_defaults(func=cmd_bench_serve)


def _add_check(sub, backend: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[backend], help="replay golden.npz with the runtime alone; exit 1 on drift (a CI gate)")
    p.add_argument("artifact")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--junit", help="write a JUnit XML report here")
    p.set_defaults(func=cmd_check)


def _add_validate(sub, quiet: argparse.ArgumentParser, backend: argparse.ArgumentParser) -> None:
    p = sub.add_parser("validate", parents=[backend, quiet], help="runtime vs the PyTorch reference: errors, top-1, greedy prefix, perplexity")
    p.add_argument("artifact")
    p.add_argument("--reference", required=True, help="the checkpoint the artifact was exported from")
    p.add_argument("--prompts", help="text file, one prompt per line (default: three built-in prompts)")
    p.add_argument("--steps", type=int, default=32, help="greedy steps per prompt (default 32)")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--layerwise", action="store_true", help="also report the first block whose hidden state drifts")
    p.set_defaults(func=cmd_validate)


def _add_build_engine(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT fp16 engine (two optimisation profiles) into the artifact")
    p.add_argument("artifact", help="an fp16 artifact folder (neodeploy export --precision fp16)")
    p.add_argument("--profile", required=True, help="a shipped profile (chat, batch, edge) or a .toml file")
    p.add_argument("--timing-cache", help="TensorRT timing cache file to reuse and update")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace", type=float, help="workspace memory limit in GiB")
    p.set_defaults(func=cmd_build_engine)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill / decode speed of the runtime against its peers, in one run")
    p.add_argument("artifact")
    p.add_argument("--checkpoint", help="checkpoint for the peers (default: the one the artifact was exported from)")
    p.add_argument("--compare", default=None, help="comma-separated peers: reference, transformers, optimum, optimum-int8 (Optimum's export "
                   "quantised by its ORTQuantizer), llama.cpp "
                   "(default: reference,transformers,optimum)")
    p.add_argument("--gguf", help="GGUF file of the same checkpoint, for --compare llama.cpp")
    p.add_argument("--threads", type=int, help="threads for neodeploy and llama.cpp alike (default: the cores "
                   "this process may use)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--repeat", type=int, default=5, help="alternating repeats after a warm-up (default 5)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG chart here (matplotlib)")
    p.set_defaults(func=cmd_bench)


def _add_lint(sub) -> None:
    p = sub.add_parser("lint", help="TensorRT readiness without a GPU: ops, control flow, bindings, profile shapes")
    p.add_argument("artifact")
    p.add_argument("--profile", help="a shipped profile name or a .toml file (default: every shipped profile)")
    p.add_argument("--no-polygraphy", action="store_true", help="skip polygraphy's check lint")
    p.set_defaults(func=cmd_lint)


def _add_demo(sub, quiet: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[quiet], help="the main job end to end on a built-in default model (no network, no files)")
    p.add_argument("--preset", help="run on a random-initialised published architecture instead of the trained "
                   "byte-level default")
    p.add_argument("--train-steps", type=int, default=DemoOptions.train_steps, help="train the default model anew for "
                   "this many seeded steps (default: the shipped copy, trained by the same code for 1200 steps)")
    p.add_argument("--train-seconds", type=float, help="also stop training after this many seconds (the model then "
                   "depends on the machine's speed; default: no time limit)")
    p.add_argument("--workdir", help="keep the checkpoint and artifact here (default: a temporary folder, removed)")
    p.add_argument("--prompt", default=DemoOptions.prompt, help="the prompt to continue")
    p.add_argument("--max-new-tokens", type=int, default=DemoOptions.max_new_tokens, help="tokens to generate")
    p.add_argument("--precision", default=DemoOptions.precision, help="export precision: fp32 or fp16")
    p.set_defaults(func=cmd_demo)


def _check_output_paths(args: argparse.Namespace) -> None:
    """Report and chart paths are checked before the work, not after it: a missing folder or a folder where a file
    belongs is one line up front."""
    for flag in ("report", "junit", "json", "plot"):
        value = getattr(args, flag, None)
        if not isinstance(value, str):  # --json is a switch on some commands
            continue
        path = Path(value)
        if path.is_dir():
            raise UsageError(f"--{flag} {path} is a folder; give a file path")
        if not path.parent.is_dir():
            raise UsageError(f"--{flag} {path}: the folder {path.parent} does not exist; create it first")
    workdir = getattr(args, "workdir", None)
    if workdir and Path(workdir).exists() and not Path(workdir).is_dir():
        raise UsageError(f"--workdir {workdir} is a file; give a folder")


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a pipe (tee, CI logs) as they are printed
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from neodeploy.core import progress

        progress.set_quiet(True)
    if getattr(args, "max_new_tokens", 1) is not None and getattr(args, "max_new_tokens", 1) < 1:
        print("neodeploy: error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        _check_output_paths(args)
        return args.func(args)
    except NeodeployError as exc:
        print(f"neodeploy: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("neodeploy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `neodeploy inspect … | head`: the reader left; stop quietly, as shell tools do
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # the environment failed (disk full, permissions, a vanished file): one line, not a trace
        from neodeploy.core.files import os_reason

        print(f"neodeploy: error: {os_reason(exc)}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a stage whose extra is not installed: say which, never a traceback
        root = (exc.name or "").split(".")[0]
        extra = next((e for e, modules in EXTRAS.items() if root in modules), None)
        if extra is None:
            raise
        print(f"neodeploy: error: `neodeploy {args.command}` needs the {extra!r} extra ({root} is not installed): "
              f"pip install 'neodeploy[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
