"""`neodeploy export`: checkpoint folder -> verified artifact folder, built beside OUT_DIR and renamed at the end."""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neodeploy import __version__
from neodeploy.core.errors import ExportError, UsageError, VerificationError
from neodeploy.core.files import check_destination, is_write_failure, make_temp_dir, normalise_permissions, publish, write_failed
from neodeploy.core.manifest import write_manifest
from neodeploy.core.progress import live
from neodeploy.core.spec import MAX_POSITIONS, ModelSpec, load_spec
from neodeploy.core.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, Tokenizer
from neodeploy.core.tolerances import TOLERANCES
from neodeploy.export import cuda as cuda_graph, graph, memory, ort_fusion, refcache, verify
from neodeploy.export import quantize as quantization
from neodeploy.export.options import PRECISIONS, ExportOptions  # noqa: F401 - export.PRECISIONS for callers

COPIED = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"neodeploy": __version__}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class Progress:
    """Stage-by-stage progress lines with times."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.index, self.start = total, echo, 0, time.perf_counter()
        self.times: dict[str, float] = {}

    def stage(self, name: str, detail: str = ""):
        progress = self

        class _Stage:
            def __enter__(self):
                progress.index += 1
                self.t0 = time.perf_counter()
                progress.echo(f"[{progress.index}/{progress.total}] {name}{': ' + detail if detail else ''} ...")
                self._live = live(name)  # the elapsed time, live, on a terminal
                self._live.__enter__()
                return self

            def __exit__(self, kind, exc, tb):
                self._live.__exit__(kind, exc, tb)
                if kind is None:
                    elapsed = time.perf_counter() - self.t0
                    progress.times[name] = round(elapsed, 2)
                    progress.echo(f"      {name} done in {elapsed:.1f} s")

        return _Stage()


def check_request(checkpoint: Path, out_dir: Path, options: ExportOptions) -> tuple[ModelSpec, ExportOptions]:
    """What needs the checkpoint, before any heavy work, so a bad request writes nothing (the options checked
    themselves when made): the spec, and the options with max_context resolved."""
    max_context = options.max_context
    spec = load_spec(checkpoint)
    if max_context is None:
        max_context = spec.max_positions
    if max_context < verify.DECODE_STEPS + 2:
        raise UsageError(f"--max-context {max_context} is too small; it must be at least {verify.DECODE_STEPS + 2}")
    if max_context > MAX_POSITIONS:  # the manifest's own bound, checked before the work instead of after it
        raise UsageError(f"--max-context {max_context} is beyond any model ({MAX_POSITIONS} at most)")
    if spec.family == "gpt_neo" and max_context > spec.max_positions:
        raise UsageError(
            f"--max-context {max_context} exceeds the {spec.max_positions} learned positions of this GPT-Neo "
            f"checkpoint; use at most {spec.max_positions}"
        )
    check_destination(out_dir, options.overwrite, ExportError)
    if out_dir.resolve() == checkpoint.resolve() or out_dir.resolve() in checkpoint.resolve().parents:
        raise ExportError("OUT_DIR is or contains the checkpoint folder (--overwrite would delete it); "
                          "choose a new folder for the artifact")
    return spec, dataclasses.replace(options, max_context=max_context)


@dataclass
class Built:
    """What the stages made, from which `_manifest` writes the manifest."""

    spec: ModelSpec
    checkpoint: Path
    options: ExportOptions  # max_context resolved
    tokenizer: Tokenizer | None = None
    results: list[verify.CaseResult] = field(default_factory=list)
    nodes: tuple[int, int] = (0, 0)  # before and after cleaning
    fused: dict[str, int] | None = None  # cpu target: the onnxruntime fusions
    quantization: dict | None = None
    times: dict[str, float] = field(default_factory=dict)


def export(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions | None = None, *,
           echo: Callable[[str], None] = print, **keywords) -> Path:
    """Export CHECKPOINT to a verified artifact folder OUT_DIR; raises VerificationError (nothing published) on drift.

    The request is `options` (ExportOptions), or its fields as keywords (`export(ckpt, out, precision="fp16")`);
    keywords given with options replace those fields. logits: "all" positions (portable default: score /
    perplexity in one run) or the "last" only (what generation reads; a TensorRT prefill then does not compute
    [batch, prompt, vocab] fp32 logits). The cpu target is last only, recorded as "tail": its graph returns the last
    `num_logits` positions when that input is bound (speculation). chat_template: Jinja text written as
    chat_template.jinja (listed with its sha256; the server prefers it to the checkpoint's tokenizer_config.json
    template)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    options = ExportOptions(**keywords) if options is None else dataclasses.replace(options, **keywords)
    spec, options = check_request(checkpoint, out_dir, options)
    memory.check(spec, options.max_memory, ExportError)  # said before any work, from the spec
    built = Built(spec, checkpoint, options)
    cpu, cuda = options.target == "cpu", options.target == "cuda"
    progress = Progress(6 + bool(options.quantize) + cpu, echo)
    built.times = progress.times
    gate, max_context, precision = options.gate, options.max_context, options.precision
    tmp = make_temp_dir(out_dir, ExportError)
    try:
        with progress.stage("reference", f"{checkpoint} ({spec.family}, {spec.num_layers} layers): fp32 greedy on golden prompts"):
            built.tokenizer = _tokenizer_or_none(checkpoint)
            cases = verify.golden_cases(spec, built.tokenizer, max_context)
            digest = refcache.key(checkpoint, cases, verify.DECODE_STEPS) if options.reuse_reference else None
            if digest and refcache.load(digest, cases):
                echo(f"      reference reused from {refcache.cache_dir()} (same checkpoint files and golden cases)")
            else:
                cases = verify.reference_in_subprocess(checkpoint, cases)
                if digest:
                    refcache.save(digest, cases)
        onnx_path = tmp / "model.onnx"
        with progress.stage("trace", f"torch.onnx.export(dynamo=True), opset {options.opset}, {precision}, in a child process"):
            graph.trace_in_subprocess(checkpoint, onnx_path, options.opset, precision, last_logits_only=options.last_logits,
                                      fused_attention=options.in_place, max_context=max_context, by_lengths=cuda)
        with progress.stage("convert", "I/O contract, dimension names, IR version"):
            graph.convert(onnx_path, spec, precision)
        with progress.stage("clean", "onnxslim constant folding and dead-node removal"):
            built.nodes = graph.clean(onnx_path)
            echo(f"      nodes: {built.nodes[0]} -> {built.nodes[1]}")
        if cpu:
            with progress.stage("fuse", "onnxruntime transformer optimizer (CPU target)"):
                built.fused = graph.in_subprocess(ort_fusion.fuse, onnx_path, spec)
                echo(f"      fused: {', '.join(f'{op} x{n}' for op, n in built.fused.items()) or 'nothing'}")
                if not options.in_place:
                    echo("      attention stays unfused: the fused CPU attention is fp32 "
                         "(onnxruntime's kernel is slower in fp16)")
        if options.quantize:
            with progress.stage("quantize", f"{options.quantize} weights with onnxruntime.quantization"):
                built.quantization = graph.in_subprocess(quantization.quantize, onnx_path, options.quantize,
                                                         options.block_size, options.head_bits, cpu or options.quantize == "int4")
                echo(f"      {built.quantization['quantized_matmuls']} MatMuls quantised ({built.quantization['ops']})")
        if cpu:  # last position by default, the last num_logits on request (speculative decoding's verification)
            graph.tail_logits(onnx_path)
        if cuda:  # rows left-aligned: each row's last real position, not the last column
            cuda_graph.last_real_logits(onnx_path)
        with progress.stage("verify", f"onnxruntime CPU vs reference, {len(cases)} cases x {verify.DECODE_STEPS} steps"):
            decoder = verify.OnnxDecoder(onnx_path, spec)
            with live("verify", total=len(cases), unit="case") as bar:
                for case in cases:
                    built.results.append(verify.compare(decoder, case, gate, aligned=cuda))
                    bar.update()
            del decoder
            echo(verify.verification_table(built.results, gate))
            if not all(r.passed for r in built.results):
                failed = next(r for r in built.results if not r.passed)
                raise VerificationError(
                    f"verification failed on case {failed.name!r} ({'; '.join(failed.notes)}); nothing was published"
                )
        with progress.stage("write", str(out_dir)):
            verify.save_golden(tmp / "golden.npz", cases, gate, built.results)
            for name in COPIED:
                if (checkpoint / name).is_file():
                    shutil.copyfile(checkpoint / name, tmp / name)
            if options.chat_template is not None:
                (tmp / CHAT_TEMPLATE_FILE).write_text(options.chat_template, encoding="utf-8")
            normalise_permissions(tmp)
            write_manifest(tmp, _manifest(built))
            publish(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and is_write_failure(exc):
            need = spec.num_parameters() * (2 if precision == "fp16" else 4)
            raise write_failed(exc, out_dir, ExportError, need) from exc
        raise
    echo(f"exported {out_dir} in {time.perf_counter() - progress.start:.1f} s")
    return out_dir


def _tokenizer_or_none(checkpoint: Path) -> Tokenizer | None:
    if not any((checkpoint / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None
    return Tokenizer.from_dir(checkpoint)


def _manifest(built: Built) -> dict:
    spec, options = built.spec, built.options
    fields = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "source": {"checkpoint": str(built.checkpoint.resolve())},
        "max_context": options.max_context,
        "dtype": options.precision,
        "onnx": {
            "file": "model.onnx",
            "external_data": "model.onnx" + graph.DATA_SUFFIX,
            "opset": options.opset,
            "ir_version": graph.IR_VERSION,
            "target": "portable",
            "logits": "all",
            "kv_cache": "concatenated",
            "rotary": "graph",
            "inputs": graph.input_names(spec),
            "outputs": graph.output_names(spec),
            "nodes_before_clean": built.nodes[0],
            "nodes": built.nodes[1],
            "fp32_islands": ["LayerNormalization", "Softmax", *(["GPT-Neo q·kᵀ"] if spec.family == "gpt_neo" else []),
                             "logits"] if options.precision == "fp16" else [],
        },
        "tokenizer": None if built.tokenizer is None else {
            "eos_token_id": built.tokenizer.eos_token_id,
            "pad_token_id": built.tokenizer.pad_token_id,
            "bos_token_id": built.tokenizer.bos_token_id,
        },
        "verification": {
            "tolerance_relative": TOLERANCES[options.gate].max_rel_error,
            "decode_steps": verify.DECODE_STEPS,
            "cases": [
                {"name": r.name, "batch": r.batch, "prompt_lengths": r.prompt_lengths,
                 "max_abs_error": r.max_abs_error, "scale": r.scale, "greedy_agree": r.greedy_agree,
                 "greedy_total": r.greedy_total}
                for r in built.results
            ],
        },
        "stage_seconds": built.times,
        "versions": _versions(),
    }
    if built.quantization:
        fields["quantization"] = built.quantization
    onnx = fields["onnx"]
    onnx["logits"] = "last" if options.last_logits else "all"
    if options.in_place:  # the fused attention and its in-place cache
        onnx.update(kv_cache="in-place", rotary="kernel" if spec.rotary_in_kernel else "graph")
    if options.target == "cpu":  # last position by default, the last num_logits on request
        onnx.update(logits="tail", target="cpu", fused=built.fused)
    if options.target == "cuda":  # the kernel computes q·kᵀ and softmax with fp32 accumulators: the islands are inside it
        onnx.update(target="cuda", fp32_islands=["LayerNormalization", "GroupQueryAttention (in-kernel)", "logits"])
    return fields
