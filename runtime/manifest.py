"""The artifact manifest (neodeploy.json): the contract between export, build-engine and the runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neodeploy.errors import ArtifactError
from neodeploy.files import sha256

MANIFEST = "neodeploy.json"
FORMAT = "neodeploy-artifact"
FORMAT_VERSION = 1


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_hashes(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.is_file():
        raise ArtifactError(f"{folder} is a file, not an artifact folder; give the folder `neodeploy export` wrote")
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; run `neodeploy export` first")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; it is not a neodeploy artifact (run `neodeploy export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON; re-export the artifact") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a neodeploy manifest; re-export the artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')!r}, this neodeploy reads {FORMAT_VERSION}; "
            "re-export the artifact with this version"
        )
    check_manifest(manifest, path)
    return manifest


_OPTIONAL = object()


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Every field the runtime, check, lint and the TensorRT backend read, by type and range: a hand-edited or
    truncated manifest is one ArtifactError naming the field, never a KeyError or TypeError later."""
    from neodeploy.errors import ConfigError
    from neodeploy.reference.spec import ModelSpec

    def fail(field: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{path}: {field} must be {expected}; re-export the artifact")

    def want(container: Any, key: str, kind, expected: str, where: str, optional: bool = False):
        if not isinstance(container, dict) or key not in container:
            if optional:
                return None
            raise fail(f"{where}{key}", f"present ({expected})")
        value = container[key]
        if optional and value is None:
            return None
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise fail(f"{where}{key}", expected)
        return value

    spec = want(manifest, "spec", dict, "an object (the ModelSpec)", "")
    try:
        ModelSpec.from_dict(spec)
    except (ConfigError, TypeError, ValueError) as exc:
        message = str(exc).split(";")[0] if isinstance(exc, ConfigError) else f"incomplete ({exc})"
        raise ArtifactError(f"{path}: its spec is not a valid ModelSpec: {message}; re-export the artifact") from None
    # Quantised exports record their quantisation here too (the precision / quantisation split is to come).
    if want(manifest, "precision", str, "fp32, fp16, int8 or int4", "") not in ("fp32", "fp16", "int8", "int4"):
        raise fail("precision", "fp32, fp16, int8 or int4")
    if not 1 <= want(manifest, "max_context", int, "a positive integer", "") <= 1 << 24:
        raise fail("max_context", "a positive integer (at most 2^24)")
    onnx = want(manifest, "onnx", dict, "an object", "")
    for key in ("file", "external_data"):
        want(onnx, key, str, "a file name", "onnx.")
    for key, allowed in (("kv_cache", ("in-place",)), ("logits", ("last", "all")), ("target", ("portable", "cpu"))):
        value = want(onnx, key, str, " or ".join(allowed), "onnx.", optional=True)
        if value is not None and value not in allowed:
            raise fail(f"onnx.{key}", " or ".join(f'"{a}"' for a in allowed))
    files = want(manifest, "files", dict, "an object of file name -> sha256", "")
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise fail(f"files[{name!r}]", "a sha256 hex digest")
    tokenizer = want(manifest, "tokenizer", dict, "an object", "", optional=True)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = want(tokenizer, key, int, "a token id or null", "tokenizer.", optional=True)
        if value is not None and value < 0:
            raise fail(f"tokenizer.{key}", "a non-negative token id")
    for key in ("quantization", "engine", "verification"):
        want(manifest, key, dict, "an object", "", optional=True)


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


def verify_files(folder: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check the sha256 of the named files (all listed files by default) against the manifest."""
    folder = Path(folder)
    listed: dict[str, str] = manifest.get("files", {})
    if not isinstance(listed, dict):
        raise ArtifactError(f"{folder / MANIFEST} has no valid 'files' table; re-export the artifact")
    for name in names if names is not None else list(listed):
        if name not in listed:
            raise ArtifactError(f"{name} is not listed in {MANIFEST}; re-export the artifact")
        path = artifact_path(folder, name)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-export it")
        if sha256(path) != listed[name]:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or was modified")

