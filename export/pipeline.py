"""`neodeploy export`: checkpoint folder -> verified artifact folder, built beside OUT_DIR and renamed at the end."""

from __future__ import annotations

import datetime
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from neodeploy import __version__
from neodeploy.core.errors import ExportError, UsageError, VerificationError
from neodeploy.core.files import check_destination, is_write_failure, make_temp_dir, normalise_permissions, publish, write_failed
from neodeploy.core.manifest import write_manifest
from neodeploy.core.progress import live
from neodeploy.core.spec import MAX_POSITIONS, load_spec
from neodeploy.core.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, Tokenizer
from neodeploy.core.tolerances import TOLERANCES
from neodeploy.export import cuda as cuda_graph, graph, memory, ort_fusion, refcache, verify
from neodeploy.export import quantize as quantization

PRECISIONS = ("fp32", "fp16")
TARGETS = ("portable", "cpu", "cuda")
LOGITS = ("all", "last")
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


def check_request(checkpoint: Path, out_dir: Path, precision: str, opset: int, max_context: int | None,
                  overwrite: bool, quantize: str | None = None, block_size: int = quantization.DEFAULT_BLOCK,
                  head_bits: int = quantization.DEFAULT_HEAD_BITS):
    """Every argument error before any heavy work, so a bad request writes nothing."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not supported; choose fp32 or fp16")
    if quantize is not None:
        if quantize not in quantization.METHODS:
            raise UsageError(f"--quantize {quantize!r} is not supported; choose int8 or int4")
        if precision != "fp32":
            raise UsageError("--quantize applies to fp32 exports (weights are quantised from fp32); drop --precision fp16")
        if quantize == "int4" and block_size not in quantization.BLOCK_SIZES:
            raise UsageError(f"--block-size {block_size} is not supported; choose 32, 64 or 128")
        if quantize == "int4" and head_bits not in quantization.HEAD_BITS:
            raise UsageError(f"--head-bits {head_bits} is not supported; choose 8 or 4")
    if opset not in graph.SUPPORTED_OPSETS:
        raise UsageError(
            f"opset {opset} is not supported; choose {graph.SUPPORTED_OPSETS.start}..{graph.SUPPORTED_OPSETS.stop - 1} "
            f"(default {graph.DEFAULT_OPSET})"
        )
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
    check_destination(out_dir, overwrite, ExportError)
    if out_dir.resolve() == checkpoint.resolve() or out_dir.resolve() in checkpoint.resolve().parents:
        raise ExportError("OUT_DIR is or contains the checkpoint folder (--overwrite would delete it); "
                          "choose a new folder for the artifact")
    return spec, max_context


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    opset: int = graph.DEFAULT_OPSET,
    max_context: int | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
    block_size: int = quantization.DEFAULT_BLOCK,
    head_bits: int = quantization.DEFAULT_HEAD_BITS,
    target: str = "portable",
    logits: str | None = None,
    echo: Callable[[str], None] = print,
    reuse_reference: bool = True,
    max_memory: int | None = None,
    chat_template: str | None = None,
) -> Path:
    """Export CHECKPOINT to a verified artifact folder OUT_DIR; raises VerificationError (nothing published) on drift.

    logits: "all" positions (portable default: score / perplexity in one run) or the "last" only (what generation
    reads; a TensorRT prefill then does not compute [batch, prompt, vocab] fp32 logits). The cpu target is last only,
    recorded as "tail": its graph returns the last `num_logits` positions when that input is bound (speculation).
    chat_template: Jinja text written as chat_template.jinja (listed with its sha256; the server prefers it to the
    checkpoint's tokenizer_config.json template)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if target not in TARGETS:
        raise UsageError(f"--target {target!r} is not supported; choose portable (TensorRT, Optimum), cpu or cuda")
    if target == "cuda" and (precision != "fp16" or quantize):
        raise UsageError("--target cuda is fp16 (onnxruntime's CUDA GroupQueryAttention runs fp16 only): "
                         "export with --precision fp16 and no --quantize")
    if target == "cuda" and logits == "all":
        raise UsageError("--target cuda returns last-position logits only; drop --logits all, or export --target portable")
    if logits is None:
        logits = "last" if target in ("cpu", "cuda") else "all"
    if logits not in LOGITS:
        raise UsageError(f"--logits {logits!r} is not supported; choose all or last")
    if target == "cpu" and logits != "last":
        raise UsageError("--target cpu returns last-position logits only; drop --logits all, or export --target portable")
    spec, max_context = check_request(checkpoint, out_dir, precision, opset, max_context, overwrite, quantize,
                                      block_size, head_bits)
    memory.check(spec, max_memory, ExportError)  # said before any work, from the spec
    cpu, cuda = target == "cpu", target == "cuda"
    # The fused attention and its in-place cache are fp32 (onnxruntime's CPU kernel ran slower in fp16): an fp16 CPU
    # export keeps the plain attention.
    in_place = cpu and precision == "fp32"
    progress = Progress(6 + bool(quantize) + cpu, echo)
    gate = quantize or precision  # the verification tolerance that applies
    tmp = make_temp_dir(out_dir, ExportError)
    try:
        with progress.stage("reference", f"{checkpoint} ({spec.family}, {spec.num_layers} layers): fp32 greedy on golden prompts"):
            tokenizer = _tokenizer_or_none(checkpoint)
            cases = verify.golden_cases(spec, tokenizer, max_context)
            digest = refcache.key(checkpoint, cases, verify.DECODE_STEPS) if reuse_reference else None
            if digest and refcache.load(digest, cases):
                echo(f"      reference reused from {refcache.cache_dir()} (same checkpoint files and golden cases)")
            else:
                cases = verify.reference_in_subprocess(checkpoint, cases)
                if digest:
                    refcache.save(digest, cases)
        onnx_path = tmp / "model.onnx"
        with progress.stage("trace", f"torch.onnx.export(dynamo=True), opset {opset}, {precision}, in a child process"):
            graph.trace_in_subprocess(checkpoint, onnx_path, opset, precision, last_logits_only=logits == "last",
                                      fused_attention=in_place or cuda, max_context=max_context, by_lengths=cuda)
        with progress.stage("convert", "I/O contract, dimension names, IR version"):
            graph.convert(onnx_path, spec, precision)
        with progress.stage("clean", "onnxslim constant folding and dead-node removal"):
            before, after = graph.clean(onnx_path)
            echo(f"      nodes: {before} -> {after}")
        fused = None
        if cpu:
            with progress.stage("fuse", "onnxruntime transformer optimizer (CPU target)"):
                fused = graph.in_subprocess(ort_fusion.fuse, onnx_path, spec)
                echo(f"      fused: {', '.join(f'{op} x{n}' for op, n in fused.items()) or 'nothing'}")
                if not in_place:
                    echo("      attention stays unfused: the fused CPU attention is fp32 "
                         "(onnxruntime's kernel is slower in fp16)")
        quant_entry = None
        if quantize:
            with progress.stage("quantize", f"{quantize} weights with onnxruntime.quantization"):
                quant_entry = graph.in_subprocess(quantization.quantize, onnx_path, quantize, block_size,
                                                  head_bits, cpu or quantize == "int4")
                echo(f"      {quant_entry['quantized_matmuls']} MatMuls quantised ({quant_entry['ops']})")
        if cpu:  # last position by default, the last num_logits on request (speculative decoding's verification)
            graph.tail_logits(onnx_path)
            logits = "tail"
        if cuda:  # rows left-aligned: each row's last real position, not the last column
            cuda_graph.last_real_logits(onnx_path)
        with progress.stage("verify", f"onnxruntime CPU vs reference, {len(cases)} cases x {verify.DECODE_STEPS} steps"):
            decoder = verify.OnnxDecoder(onnx_path, spec)
            with live("verify", total=len(cases), unit="case") as bar:
                results = []
                for case in cases:
                    results.append(verify.compare(decoder, case, gate, aligned=cuda))
                    bar.update()
            del decoder
            echo(verify.verification_table(results, gate))
            if not all(r.passed for r in results):
                failed = next(r for r in results if not r.passed)
                raise VerificationError(
                    f"verification failed on case {failed.name!r} ({'; '.join(failed.notes)}); nothing was published"
                )
        with progress.stage("write", str(out_dir)):
            verify.save_golden(tmp / "golden.npz", cases, gate, results)
            for name in COPIED:
                if (checkpoint / name).is_file():
                    shutil.copyfile(checkpoint / name, tmp / name)
            if chat_template is not None:
                (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
            normalise_permissions(tmp)
            manifest = _manifest(spec, checkpoint, precision, gate, opset, max_context, tokenizer, results, before,
                                 after, progress.times)
            if quant_entry:
                manifest["quantization"] = quant_entry
            manifest["onnx"]["logits"] = logits
            if cpu:
                manifest["onnx"].update(target="cpu", fused=fused)
                if in_place:
                    manifest["onnx"].update(kv_cache="in-place", rotary="kernel" if spec.rotary_in_kernel else "graph")
            if cuda:  # the kernel computes q·kᵀ and softmax with fp32 accumulators: the attention islands are inside it
                manifest["onnx"].update(target="cuda", kv_cache="in-place",
                                        rotary="kernel" if spec.rotary_in_kernel else "graph",
                                        fp32_islands=["LayerNormalization", "GroupQueryAttention (in-kernel)", "logits"])
            write_manifest(tmp, manifest)
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


def _manifest(spec, checkpoint, precision, gate, opset, max_context, tokenizer, results, before, after, times) -> dict:
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "source": {"checkpoint": str(checkpoint.resolve())},
        "max_context": max_context,
        "dtype": precision,
        "onnx": {
            "file": "model.onnx",
            "external_data": "model.onnx" + graph.DATA_SUFFIX,
            "opset": opset,
            "ir_version": graph.IR_VERSION,
            "target": "portable",
            "logits": "all",
            "kv_cache": "concatenated",
            "rotary": "graph",
            "inputs": graph.input_names(spec),
            "outputs": graph.output_names(spec),
            "nodes_before_clean": before,
            "nodes": after,
            "fp32_islands": ["LayerNormalization", "Softmax", *(["GPT-Neo q·kᵀ"] if spec.family == "gpt_neo" else []),
                             "logits"] if precision == "fp16" else [],
        },
        "tokenizer": None if tokenizer is None else {
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "verification": {
            "tolerance_relative": TOLERANCES[gate].max_rel_error,
            "decode_steps": verify.DECODE_STEPS,
            "cases": [
                {"name": r.name, "batch": r.batch, "prompt_lengths": r.prompt_lengths,
                 "max_abs_error": r.max_abs_error, "scale": r.scale, "greedy_agree": r.greedy_agree,
                 "greedy_total": r.greedy_total}
                for r in results
            ],
        },
        "stage_seconds": times,
        "versions": _versions(),
    }
