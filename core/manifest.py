"""The artifact manifest (neodeploy.json): the contract between export, build-engine and the runtime.

`Manifest` is the typed, validated view every stage reads (built once, as ModelSpec is; the facts derived from it
— head width, KV dtype and bytes per token, where rotary happens — are computed here and nowhere else), and
`write_manifest` is its one writer, which refuses to write what the reader would refuse.

"dtype" is the float type of activations, the KV cache and every weight left unquantised (fp32, fp16);
"quantization" says which weights were quantised and how (int8, int4). Format version 1 had one "precision" field
for both; it is still read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from neodeploy.core.errors import ArtifactError, ConfigError
from neodeploy.core.files import sha256
from neodeploy.core.spec import ModelSpec

MANIFEST = "neodeploy.json"
FORMAT = "neodeploy-artifact"
FORMAT_VERSION = 2
READS = (1, 2)
DTYPES = ("fp32", "fp16")
TARGETS = ("portable", "cpu", "cuda")  # cuda: rows left-aligned in the cache, masks right-padded (runtime/aligned.py)
QUANTIZATIONS = ("int8", "int4")
_NOT_FIELDS = ("format", "format_version", "files", "precision")  # the writer sets these (precision: version 1)


@dataclasses.dataclass(frozen=True)
class OnnxGraph:
    file: str
    external_data: str
    opset: int | None
    target: str  # portable | cpu | cuda
    logits: str  # all | last | tail (positions the graph returns logits for; tail: the last, or the last num_logits)
    kv_cache: str  # concatenated | in-place
    rotary: str  # graph | kernel (GroupQueryAttention rotates keys at their cache index)
    fused: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Quantization:
    method: str  # int8 | int4
    ops: str | None  # what the quantiser rewrote, e.g. "MatMul -> MatMulNBits"
    data: dict[str, Any]  # the section as written (block size, head bits, counts), for writing an updated copy

    @property
    def depends_on_batch(self) -> bool:
        """A request's tokens can change with what runs beside it. int8 quantises activations with one scale per
        tensor, and in a batch that tensor holds every row. int4's MatMulNBits scales each row and block on its own,
        but the floats it rounds to int8 differ in their last bits with the call's shape, and a rounding step
        magnifies that: at a near-tie a token changes (pythia-160m int4 served with --max-running 4 failed the
        serve gate on one golden prompt)."""
        return self.method in ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict[str, Any]  # the JSON as read, for inspect and for writing an updated copy
    spec: ModelSpec
    dtype: str
    quantization: Quantization | None
    max_context: int
    onnx: OnnxGraph
    files: dict[str, str]
    tokenizer: dict[str, int | None]
    engine: dict[str, Any] | None

    @property
    def precision(self) -> str:
        """The label users see and the verification gate that applies: the quantisation if any, else the dtype."""
        return self.quantization.method if self.quantization else self.dtype

    @property
    def kv_bytes(self) -> int:
        return 2 if self.dtype == "fp16" else 4

    @property
    def kv_dtype(self):
        import numpy as np

        return np.float16 if self.dtype == "fp16" else np.float32

    @property
    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_values_per_token * self.kv_bytes

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.get("eos_token_id")
        return self.spec.eos_token_id if eos is None else eos

    def fields(self) -> dict[str, Any]:
        """The manifest's content in this version's spelling, for write_manifest to write an updated copy."""
        fields = {k: v for k, v in self.data.items() if k not in _NOT_FIELDS}
        fields["dtype"] = self.dtype
        if self.quantization:
            fields["quantization"] = self.quantization.data
        return fields

    @classmethod
    def from_dict(cls, data: Any, folder: str | Path = ".") -> Manifest:
        """Every field the runtime, check, lint and the TensorRT backend read, by type and range: a hand-edited
        or truncated manifest is one ArtifactError naming the field, never a KeyError or TypeError later."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a neodeploy manifest; re-export the artifact")
        version = data.get("format_version")
        if isinstance(version, bool) or version not in READS:
            raise ArtifactError(f"{path} has format version {version!r}, this neodeploy reads "
                                f"{' and '.join(map(str, READS))}; re-export the artifact with this version")

        def fail(field: str, expected: str) -> ArtifactError:
            return ArtifactError(f"{path}: {field} must be {expected}; re-export the artifact")

        def want(container: Any, key: str, kind, expected: str, where: str = "", default: Any = ...):
            if not isinstance(container, dict) or container.get(key) is None:
                if default is not ...:
                    return default
                raise fail(f"{where}{key}", f"present ({expected})")
            value = container[key]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise fail(f"{where}{key}", expected)
            return value

        def one_of(container: Any, key: str, allowed: tuple[str, ...], where: str = "", default: Any = ...):
            expected = " or ".join(f'"{a}"' for a in allowed)
            value = want(container, key, str, expected, where, default)
            if value not in allowed and value is not default:
                raise fail(f"{where}{key}", expected)
            return value

        raw_spec = want(data, "spec", dict, "an object (the ModelSpec)")
        try:
            spec = ModelSpec.from_dict(raw_spec)
        except (ConfigError, TypeError, ValueError) as exc:
            message = str(exc).split(";")[0] if isinstance(exc, ConfigError) else f"incomplete ({exc})"
            raise ArtifactError(f"{path}: its spec is not a valid ModelSpec: {message}; re-export the artifact") from None

        quantization = want(data, "quantization", dict, "an object", default=None)
        if quantization is not None:
            one_of(quantization, "method", QUANTIZATIONS, "quantization.")
        if version == 1:  # one "precision" field named the dtype or the quantisation
            precision = one_of(data, "precision", DTYPES + QUANTIZATIONS)
            dtype = "fp16" if precision == "fp16" else "fp32"
            if precision in QUANTIZATIONS and quantization is None:
                quantization = {"method": precision}
            if quantization is not None and quantization.get("method") != precision:
                raise fail("quantization.method", f'"{precision}" (the manifest\'s precision)')
        else:
            dtype = one_of(data, "dtype", DTYPES)
        if quantization is not None and dtype != "fp32":
            raise fail("dtype", '"fp32" in a quantised export (weights are quantised from fp32)')

        max_context = want(data, "max_context", int, "a positive integer")
        if not 1 <= max_context <= 1 << 24:
            raise fail("max_context", "a positive integer (at most 2^24)")

        onnx = want(data, "onnx", dict, "an object")
        names = {key: want(onnx, key, str, "a file name", "onnx.") for key in ("file", "external_data")}
        opset = want(onnx, "opset", int, "an integer", "onnx.", default=None)
        target = one_of(onnx, "target", TARGETS, "onnx.", default="portable")
        if target == "cuda" and dtype != "fp16":
            raise fail("dtype", '"fp16" in a --target cuda export')
        logits = one_of(onnx, "logits", ("all", "last", "tail"), "onnx.", default="all")
        kv_cache = one_of(onnx, "kv_cache", ("concatenated", "in-place"), "onnx.", default="concatenated")
        default_rotary = "kernel" if kv_cache == "in-place" and spec.rotary_in_kernel else "graph"
        rotary = one_of(onnx, "rotary", ("graph", "kernel"), "onnx.", default=default_rotary)
        if rotary == "kernel" and kv_cache != "in-place":
            raise fail("onnx.rotary", '"graph" unless the KV cache is in place')
        fused = want(onnx, "fused", dict, "an object of op name -> count", "onnx.", default={})
        if any(isinstance(n, bool) or not isinstance(n, int) for n in fused.values()):
            raise fail("onnx.fused", "an object of op name -> count")

        files = want(data, "files", dict, "an object of file name -> sha256")
        for name, digest in files.items():
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise fail(f"files[{name!r}]", "a sha256 hex digest")
        raw_tokenizer = want(data, "tokenizer", dict, "an object", default={})
        tokenizer = {}
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = want(raw_tokenizer, key, int, "a token id or null", "tokenizer.", default=None)
            if value is not None and not 0 <= value < spec.vocab_size:
                raise fail(f"tokenizer.{key}", f"a token id below the vocabulary size {spec.vocab_size}")
            tokenizer[key] = value
        engine = want(data, "engine", dict, "an object", default=None)
        if engine is not None:
            for key in ("file", "sha256", "tensorrt_version"):
                want(engine, key, str, "a string", "engine.")
        want(data, "verification", dict, "an object", default=None)
        ops = quantization.get("ops") if quantization is not None else None
        quant = None if quantization is None else Quantization(quantization["method"],
                                                               ops if isinstance(ops, str) else None, quantization)
        return cls(folder, data, spec, dtype, quant, max_context,
                   OnnxGraph(names["file"], names["external_data"], opset, target, logits, kv_cache, rotary, fused),
                   files, tokenizer, engine)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, fields: dict[str, Any], files: dict[str, str] | None = None) -> Manifest:
    """The one writer. `files` defaults to hashing every file in the folder; the manifest is validated as the
    reader validates it before anything is written, and replaces the old one in one rename."""
    fields = {k: v for k, v in fields.items() if k not in _NOT_FIELDS}
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields,
            "files": file_hashes(folder) if files is None else files}
    manifest = Manifest.from_dict(data, folder)
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.is_file():
        raise ArtifactError(f"{folder} is a file, not an artifact folder; give the folder `neodeploy export` wrote")
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; run `neodeploy export` first")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; it is not a neodeploy artifact (run `neodeploy export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON; re-export the artifact") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path} ({exc.strerror})") from exc
    return Manifest.from_dict(data, folder)


def artifact_path(folder: str | Path, name: Any) -> Path:
    """The path of a file the manifest names, confined to the artifact folder: a plain name (no folder part, no
    '..', not absolute) and no symlink that leads outside. Nothing outside the folder the user named is read."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ArtifactError(f"{MANIFEST} names the file {name!r}, which is not a plain file name inside {folder}; "
                            "re-export the artifact")
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise ArtifactError(f"{path} leads outside the artifact folder (a symlink?); re-export the artifact")
    return path


def verify_files(manifest: Manifest, names: list[str] | None = None) -> None:
    """Check the sha256 of the named files (all listed files by default) against the manifest."""
    for name in names if names is not None else list(manifest.files):
        if name not in manifest.files:
            raise ArtifactError(f"{name} is not listed in {MANIFEST}; re-export the artifact")
        path = artifact_path(manifest.folder, name)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-export it")
        if sha256(path) != manifest.files[name]:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or was modified")


def read_verified(manifest: Manifest, name: str, chunk: int = 1 << 24) -> bytearray:
    """A listed file's bytes, hashed while they are read (one pass, one copy in memory) and refused unless they
    match the manifest: for files as large as the weights, where verify-then-read would read them twice."""
    import hashlib

    if name not in manifest.files:
        raise ArtifactError(f"{name} is not listed in {MANIFEST}; re-export the artifact")
    path = artifact_path(manifest.folder, name)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-export it")
    data = bytearray(path.stat().st_size)
    digest = hashlib.sha256()
    view = memoryview(data)
    with open(path, "rb") as f:
        offset = 0
        while offset < len(data) and (n := f.readinto(view[offset : offset + chunk])):
            digest.update(view[offset : offset + n])
            offset += n
    if offset != len(data) or digest.hexdigest() != manifest.files[name]:
        raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or was modified")
    return data
