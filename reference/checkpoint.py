"""Loading Hugging Face checkpoint folders into the reference models, and writing random ones.

Safety: safetensors are preferred; `.bin` files are read only with `torch.load(weights_only=True)`;
a config that needs the checkpoint's own code (`auto_map`) is refused. Every missing, unexpected or
mis-shaped tensor is an error that names it; only the legacy buffers transformers itself ignores are
skipped.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from neodeploy.core.errors import CheckpointError, UsageError
from neodeploy.core.files import check_destination, is_write_failure, make_temp_dir, normalise_permissions, publish, write_failed
from neodeploy.core.progress import live
from neodeploy.core.spec import ModelSpec, hf_config, load_spec
from neodeploy.core.tokenizer import write_tokenizer_files
from neodeploy.reference.gpt_neo import GPTNeo
from neodeploy.reference.gpt_neox import GPTNeoX

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers older transformers versions saved; they carry nothing the model needs.
LEGACY = re.compile(r"(\.attn\.attention\.(bias|masked_bias)|\.attention\.(bias|masked_bias|rotary_emb\.inv_freq))$")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def build_model(spec: ModelSpec) -> nn.Module:
    return (GPTNeo if spec.family == "gpt_neo" else GPTNeoX)(spec)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto" keeps the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of auto, float32, float16, bfloat16")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------- reading

def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors first, shards resolved through the index."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{folder / index} is not a valid shard index; restore it from its source") from exc
            files = []
            for name in names:
                # An index may only point at files inside the checkpoint folder.
                if not isinstance(name, str) or Path(name).name != name:
                    raise CheckpointError(f"{folder / index} names shard {name!r} outside the checkpoint folder")
                if not (folder / name).is_file():
                    raise CheckpointError(f"shard {name} listed in {index} is missing; download the complete checkpoint")
                files.append(folder / name)
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder} has no weights (model.safetensors, sharded safetensors with an index, or pytorch_model.bin)"
    )


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors file ({str(exc).splitlines()[0]}); it may be truncated, re-download it"
        ) from exc


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError) as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.name} holds pickled objects other than tensors; refusing to unpickle it "
            "(convert it to safetensors from a trusted source)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({exc}); re-download it") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} does not hold a state dict (found {type(state).__name__})")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path.name} holds a non-tensor object under {name!r} ({type(value).__name__}); "
                "it is not a plain weights file"
            )
        yield name, value


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weight_files(folder):
        yield from (_iter_safetensors(path) if path.suffix == ".safetensors" else _iter_bin(path))


def _canonical_name(name: str, spec: ModelSpec) -> str:
    # transformers v5 saves GPT-NeoX's output projection as lm_head; our module keeps the v4 name.
    if spec.family == "gpt_neox" and name == "lm_head.weight":
        return "embed_out.weight"
    return name


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = torch.float32) -> nn.Module:
    """Load a checkpoint folder as a reference model in eval mode (fp32 unless asked; "auto" keeps the file's)."""
    target = parse_dtype(dtype)
    folder = Path(path)
    spec = load_spec(folder)
    with torch.device("meta"):
        model = build_model(spec)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = {"lm_head.weight", "embed_out.weight"} if spec.tied_embeddings else set()
    loaded: dict[str, torch.Tensor] = {}
    for raw_name, tensor in iter_tensors(folder):
        if LEGACY.search(raw_name):
            continue
        name = _canonical_name(raw_name, spec)
        if name in tied:
            continue  # tied to the input embedding; a copy in the file is redundant
        if name not in expected:
            raise CheckpointError(
                f"unexpected tensor {raw_name!r} in the checkpoint: the weights do not match config.json "
                f"({spec.family}, {spec.num_layers} layers); check that config.json belongs to these weights"
            )
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"tensor {raw_name!r} has shape {list(tensor.shape)} but config.json implies {list(expected[name])}; "
                "config.json does not match the weights"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {raw_name!r} has dtype {tensor.dtype}; expected floating point weights")
        loaded[name] = tensor.to(target) if target is not None else tensor
    missing = [name for name in expected if name not in loaded and name not in tied]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing in all); "
            "the weights are incomplete or belong to another architecture"
        )
    dtypes = {t.dtype for t in loaded.values()}
    if len(dtypes) > 1:
        # A mixed-dtype file (rare): settle on the widest so no tensor loses precision.
        wide = torch.float32 if torch.float32 in dtypes else next(iter(dtypes))
        loaded = {k: v.to(wide) for k, v in loaded.items()}
    for name in tied:
        if name in expected:
            source = "transformer.wte.weight" if spec.family == "gpt_neo" else "gpt_neox.embed_in.weight"
            loaded[name] = loaded[source]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- writing

def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    """Random weights that make every tensor matter: N(0, std) matrices and biases, LayerNorm gain 1 + N(0, 0.1)."""
    if "layernorm" in name or "layer_norm" in name or ".ln_" in name:
        if name.endswith(".weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=generator)
        return 0.1 * torch.randn(shape, generator=generator)
    return std * torch.randn(shape, generator=generator)


def make_checkpoint(
    spec: ModelSpec,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    init_std: float = 0.02,
    file_format: str = "safetensors",
) -> Path:
    """Write a random-initialised checkpoint in Hugging Face layout, atomically, one shard in memory at a time."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        raise UsageError("make-checkpoint needs a concrete --dtype (float32, float16 or bfloat16)")
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    if file_format not in ("safetensors", "bin"):
        raise UsageError(f"file format {file_format!r} is not one of safetensors, bin")
    check_destination(out, overwrite, UsageError)
    tmp = make_temp_dir(out, UsageError)
    try:
        with torch.device("meta"):
            model = build_model(spec)
        params = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
        if spec.tied_embeddings:
            params = [(n, s) for n, s in params if n not in ("lm_head.weight", "embed_out.weight")]
        generator = torch.Generator().manual_seed(seed)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        shard_files: list[str] = []

        def flush() -> None:
            nonlocal size
            name = f"shard-{len(shard_files):05d}"
            if file_format == "safetensors":
                save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            else:
                torch.save(shards[-1], tmp / name)
            shard_files.append(name)
            shards.append({})
            size = 0

        weight_map: dict[str, str] = {}
        with live("make-checkpoint", total=len(params), unit="tensor") as bar:
            for name, shape in params:
                tensor = _random_tensor(name, shape, generator, init_std).to(torch_dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    flush()
                shards[-1][name] = tensor
                weight_map[name] = str(len(shard_files))
                size += nbytes
                bar.update()
            flush()
        ext = "safetensors" if file_format == "safetensors" else "bin"
        stem = "model" if file_format == "safetensors" else "pytorch_model"
        total = len(shard_files)
        if total == 1:
            (tmp / shard_files[0]).rename(tmp / f"{stem}.{ext}")
        else:
            final_names = [f"{stem}-{k + 1:05d}-of-{total:05d}.{ext}" for k in range(total)]
            for old, new in zip(shard_files, final_names):
                (tmp / old).rename(tmp / new)
            index = {
                "metadata": {"total_size": sum(p.numel() for p in model.parameters()) * torch.finfo(torch_dtype).bits // 8},
                "weight_map": {n: final_names[int(k)] for n, k in weight_map.items()},
            }
            (tmp / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(spec, dtype_name), indent=2) + "\n")
        write_tokenizer_files(tmp, spec, tokenizer_dir)
        normalise_permissions(tmp)  # safetensors writes 0600 and the rest 0644: one mode, as artifacts have
        publish(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)) and is_write_failure(exc):  # safetensors: its own error
            raise write_failed(exc, out, UsageError, spec.num_parameters() * torch.finfo(torch_dtype).bits // 8) from exc
        raise
    return out
