"""Tracing the reference into one ONNX decoder graph with KV-cache I/O (Optimum's names), and tidying it.

One graph serves prefill (past length 0) and cached decode; masks are built inside it from
attention_mask, so it has no If/Loop nodes. The exporter is the one PyTorch maintains today,
torch.onnx.export(dynamo=True), with dynamic batch, sequence and past dimensions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

from neodeploy.core.errors import UsageError
from neodeploy.core.spec import ModelSpec
from neodeploy.export.options import DEFAULT_OPSET, SUPPORTED_OPSETS

# onnxruntime 1.31 reads IR version <= 13 while onnx >= 1.23 writes 14 by default: pin it.
IR_VERSION = 10
DATA_SUFFIX = ".data"


def input_names(spec: ModelSpec) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")
    ]


def output_names(spec: ModelSpec, hidden_states: bool = False) -> list[str]:
    names = ["logits"] + [f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
    # Debug graphs (validate --layerwise) also expose the embeddings and every block's output.
    return names + [f"hidden_states.{i}" for i in range(spec.num_layers + 1)] if hidden_states else names


class _Decoder(nn.Module):
    """The reference with the cache as a list of (key, value) pairs in and out, as the exporter flattens it."""

    def __init__(self, model: nn.Module, hidden_states: bool = False, last_logits_only: bool = False):
        super().__init__()
        self.model, self.hidden_states, self.last_logits_only = model, hidden_states, last_logits_only

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        return self.model(input_ids, attention_mask, position_ids, past_key_values,
                          output_hidden_states=self.hidden_states, last_logits_only=self.last_logits_only)


def _example_inputs(spec: ModelSpec, dtype: torch.dtype):
    # torch.export specialises dimensions of size 0 and 1: trace with batch 2, seq 3, past 4; the verify stage
    # proves batch 1, past 0 (prefill) and seq 1 (decode) work in the exported graph.
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, spec.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    shape = (batch, spec.num_heads, past, spec.head_dim)
    cache = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(spec.num_layers)]
    return ids, mask, pos, cache


def trace(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET, hidden_states: bool = False,
          last_logits_only: bool = False, fused_attention: bool = False, max_context: int | None = None,
          by_lengths: bool = False) -> None:
    """Export `model` to `path` + `path.data` with dynamic batch / sequence / past dimensions.

    The exporter's own save streams each weight from the torch tensors into the data file, so the export
    never holds a second in-memory copy of the weights (a ModelProto would). onnxscript's rewrite rules keep
    a reference to the last graph they matched, and through it to every weight, so callers that go on
    working should run this in a child process (see trace_in_subprocess).

    fused_attention (CPU target) traces each layer's attention core as one neodeploy::attention op and lowers it
    to onnxruntime's GroupQueryAttention (export/attention.py); by_lengths (CUDA target) in the left-aligned layout,
    without attention_bias (reference/lengths.py)."""
    if opset not in SUPPORTED_OPSETS:
        raise UsageError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    spec: ModelSpec = model.spec
    dtype = next(model.parameters()).dtype
    auto = torch.export.Dim.AUTO
    static = torch.export.Dim.STATIC
    dynamic = {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "past_key_values": [({0: auto, 1: static, 2: auto, 3: static},) * 2 for _ in range(spec.num_layers)],
    }
    if spec.family == "gpt_neox":  # GPT-Neo does not scale at all; its q·kᵀ stays in its fp32 island
        model.scale_queries_first()  # the Q-scaled form TensorRT's attention fusion matches
    translations = None
    if fused_attention:
        from neodeploy.export.attention import translation_table

        model.use_fused_attention(max_context or spec.max_positions, by_lengths=by_lengths)
        translations = translation_table()
    # The exporter narrates every stage on stdout and warns about internals; our own progress says enough.
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_loggers():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Decoder(model, hidden_states, last_logits_only),
            _example_inputs(spec, dtype),
            dynamo=True,
            input_names=input_names(spec),
            output_names=output_names(spec, hidden_states),
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=True,
            verbose=False,
            custom_translation_table=translations,
        )
        program.save(str(path), external_data=True)
    data = path.with_name(path.name + DATA_SUFFIX)
    if not data.is_file():
        raise RuntimeError(f"the exporter did not write {data.name}")


def _trace_checkpoint(checkpoint: str, path: str, opset: int, precision: str, hidden_states: bool,
                      last_logits_only: bool, fused_attention: bool, max_context: int | None,
                      by_lengths: bool = False) -> None:
    from neodeploy.reference.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, dtype=torch.float16 if precision == "fp16" else torch.float32)
    trace(model, Path(path), opset, hidden_states, last_logits_only, fused_attention, max_context, by_lengths)


def die_with_parent() -> None:
    """In a worker: the kernel kills it when its parent dies (kill -9 of `neodeploy export` must not leave a trace
    worker writing into the dead export's temporary folder). Linux only; elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def working_folder(folder: Path):
    """chdir for a stage whose tool resolves external weights against the working folder (contextlib.chdir,
    which Python 3.10 lacks)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def in_subprocess(fn, *args):
    """fn(*args) in a fresh (spawned) process that dies with this one: every byte a stage's tools hold — torch's
    exporter, onnxruntime's optimizer and quantiser, which copy whole models — goes back to the OS when it exits,
    instead of staying in this process's heap for the stages after it. fn and its result must pickle."""
    import multiprocessing
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)
    try:
        # The worker starts with Ctrl-C ignored (an ignored signal survives exec): a terminal's Ctrl-C reaches the
        # whole group, and a worker interrupted mid-import printed a KeyboardInterrupt traceback. This process
        # handles it and kills the worker below.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            future = pool.submit(fn, *args)  # spawns the worker now
        finally:
            if main and previous is not None:  # None: a handler not installed from Python, left alone
                signal.signal(signal.SIGINT, previous)
        return future.result()
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()  # a worker that ignores Ctrl-C would otherwise finish its stage before we exit
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def trace_in_subprocess(checkpoint: Path, path: Path, opset: int, precision: str, hidden_states: bool = False,
                        last_logits_only: bool = False, fused_attention: bool = False, max_context: int | None = None,
                        by_lengths: bool = False) -> None:
    """Load and trace in a fresh process, so every byte the exporter holds goes back to the OS when it exits."""
    in_subprocess(_trace_checkpoint, str(checkpoint), str(path), opset, precision, hidden_states, last_logits_only,
                  fused_attention, max_context, by_lengths)


def convert(path: Path, spec: ModelSpec, precision: str, hidden_states: bool = False) -> None:
    """Readable dimension names, a pinned IR version and the checked I/O contract; weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    _name_dynamic_dims(model, spec)
    model.ir_version = IR_VERSION
    check_io(model, spec, precision, hidden_states)
    onnx.save_model(model, str(path))


def check_io(model: onnx.ModelProto, spec: ModelSpec, precision: str, hidden_states: bool = False) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != input_names(spec) or outputs != output_names(spec, hidden_states):
        raise RuntimeError(f"exported graph has unexpected I/O names: {inputs} -> {outputs}")
    if model.graph.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RuntimeError("exported logits are not fp32")
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    if model.graph.input[3].type.tensor_type.elem_type != want:
        raise RuntimeError(f"exported KV cache is not {precision}")


@contextlib.contextmanager
def _quiet_loggers():
    names = ("torch.export", "torch._dynamo", "torch.onnx", "onnxscript", "torch.fx.experimental.symbolic_shapes")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _name_dynamic_dims(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Replace the exporter's symbols (s26, s62 + s70, ...) with Optimum's readable dimension names."""
    names = {
        "input_ids": ("batch_size", "sequence_length"),
        "position_ids": ("batch_size", "sequence_length"),
        "attention_mask": ("batch_size", "past_sequence_length + sequence_length"),
        # A last-position-only graph (CPU target) has a fixed 1 there: leave it.
        "logits": ("batch_size", "sequence_length" if not _static_dim(model, "logits", 1) else None, None),
    }
    for i in range(spec.num_layers + 1):
        names[f"hidden_states.{i}"] = ("batch_size", "sequence_length", None)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith("past_key_values."):
            wanted = ("batch_size", None, "past_sequence_length", None)
        elif value.name.startswith("present."):
            wanted = ("batch_size", None, "past_sequence_length + sequence_length", None)
        else:
            wanted = names[value.name]
        for dim, name in zip(dims, wanted):
            if name is not None:
                dim.dim_param = name
    # Intermediate shapes still use the exporter's symbols; drop them rather than leave two vocabularies.
    del model.graph.value_info[:]


def _static_dim(model: onnx.ModelProto, output: str, axis: int) -> bool:
    value = next(o for o in model.graph.output if o.name == output)
    return value.type.tensor_type.shape.dim[axis].HasField("dim_value")


@contextlib.contextmanager
def set_aside(path: Path, folder: str):
    """Move model.onnx and its data into a side folder and yield the moved model's path, so a rewriting
    tool can read it and write a new model.onnx in place; the side folder is removed afterwards."""
    import shutil

    side = path.parent / folder
    side.mkdir()
    try:
        path.rename(side / path.name)
        path.with_name(path.name + DATA_SUFFIX).rename(side / (path.name + DATA_SUFFIX))
        yield side / path.name
    finally:
        shutil.rmtree(side, ignore_errors=True)


def append_external_data(model: onnx.ModelProto, data: Path, threshold: int = 1024, align: int = 4096) -> None:
    """Initializers held inline (ones a rewrite created) of `threshold` bytes or more are appended to the data
    file, as onnx's external-data writer does, and point there: the graph file stays small, the existing weights
    are neither read nor rewritten."""
    from onnx.external_data_helper import set_external_data

    with open(data, "ab") as f:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) >= threshold:
                offset = -(-f.tell() // align) * align
                f.write(b"\0" * (offset - f.tell()))
                f.write(tensor.raw_data)
                set_external_data(tensor, data.name, offset, len(tensor.raw_data))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def clean(path: Path) -> tuple[int, int]:
    """Constant folding and dead-node removal with onnxslim; returns (nodes before, nodes after).

    The weights never enter memory: external initializers are presented to onnxslim as graph inputs (values it
    cannot fold, which is right: the exporter already folded everything weight-only) and put back afterwards,
    still pointing into model.onnx.data.
    """
    import onnxslim

    model = onnx.load(str(path), load_external_data=False)
    before = len(model.graph.node)
    contract = list_inputs(model)
    held = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    held_names = {t.name for t in held}
    inline = [t for t in model.graph.initializer if t.name not in held_names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in held)
    with contextlib.redirect_stdout(io.StringIO()):
        slimmed = onnxslim.slim(model)
    restore_inputs(slimmed, contract)
    used = {name for node in slimmed.graph.node for name in node.input}
    slimmed.graph.initializer.extend(t for t in held if t.name in used)
    _check_portable(slimmed)
    slimmed.ir_version = IR_VERSION
    onnx.save_model(slimmed, str(path))
    return before, len(slimmed.graph.node)


def list_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in model.graph.input]


def restore_inputs(model: onnx.ModelProto, contract: list[onnx.ValueInfoProto]) -> None:
    """Graph tools drop inputs no node reads (the CPU GPT-NeoX graph rotates by cache index and never reads
    position_ids); the I/O contract keeps them, so every runtime feeds every graph the same way."""
    del model.graph.input[:]
    model.graph.input.extend(contract)


def finish_rewrite(path: Path, contract: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """After a tool rewrote model.onnx in place: the contract's inputs back and our IR version. Returns the
    graph, without weights."""
    model = onnx.load(str(path), load_external_data=False)
    restore_inputs(model, contract)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save_model(model, str(path))
    return model


def _check_portable(model: onnx.ModelProto) -> None:
    bad = {"If", "Loop", "Scan"} & set(op_counts(model))
    if bad:
        raise RuntimeError(f"exported graph contains {sorted(bad)} nodes, which TensorRT cannot build")


NUM_LOGITS = "num_logits"


def tail_logits(path: Path) -> None:
    """Let a last-position graph return the last `num_logits` positions on request (speculative decoding verifies
    several drafted tokens in one call). The lm_head input's Slice [-1:] becomes [-num_logits:]; num_logits [1] is
    a required input (onnxruntime's IO binding cannot bind an input that has a default initializer): callers feed
    1 for the last position."""
    model = onnx.load(str(path), load_external_data=False)
    cut = nearest_slice(model, "logits")
    negated = f"{NUM_LOGITS}_negated"
    model.graph.node.insert(list(model.graph.node).index(cut), onnx.helper.make_node("Neg", [NUM_LOGITS], [negated]))
    cut.input[1] = negated
    model.graph.input.append(onnx.helper.make_tensor_value_info(NUM_LOGITS, onnx.TensorProto.INT64, [1]))
    logits = model.graph.output[0].type.tensor_type.shape.dim[1]
    logits.Clear()
    logits.dim_param = "num_logits"
    onnx.save_model(model, str(path))


def nearest_slice(model: onnx.ModelProto, output: str, depth: int = 6) -> onnx.NodeProto:
    """The Slice closest upstream of `output`: the last-position cut before the final LayerNorm, whatever sits
    between (fp16's Casts, int8's DynamicQuantizeLinear and scales, the lm_head's MatMul or MatMulNBits)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    frontier = [producers[output]]
    for _ in range(depth):
        cut = next((node for node in frontier if node.op_type == "Slice"), None)
        if cut is not None:
            return cut
        frontier = [producers[name] for node in frontier for name in node.input if name in producers]
    raise RuntimeError(f"the graph has no Slice within {depth} nodes before {output!r}: not a last-position graph")
