"""Small filesystem helpers every stage uses: atomic work folders, permissions, hashes. Torch-free."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int | None:
    """Bytes from a size with its unit ('512MiB', '2GB', '1.5 GiB'); None for anything else."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        return None
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_destination(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """A new folder may be created at `out` (or replaced, with overwrite): refuse before any work is done."""
    if out.resolve().parent.is_dir():
        recover_interrupted(out.resolve())
    if out.exists() and not overwrite:
        raise error(f"{out} already exists; choose another folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; choose another destination")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise error(f"parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise error(f"cannot write to {parent}; choose a writable destination")


def os_reason(exc: Exception) -> str:
    """strerror where the OS gave one; numpy, safetensors and others raise with only a message."""
    return getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


def is_write_failure(exc: BaseException) -> bool:
    """A full, read-only or failing disk (numpy and safetensors say so in words, without an errno), not a bug."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in WRITE_ERRORS
    return any(word in str(exc).lower() for word in ("space", "disk full", "quota", "read-only", "i/o error",
                                                      "problem writing"))  # numpy's tofile on a full disk


def write_failed(exc: Exception, where: Path, error: type[Exception], need_bytes: int | None = None) -> Exception:
    """The one line for a write that failed (disk full, quota, read-only, permissions) while building `where`:
    what failed, where, and that nothing was published (the work folder is removed, an old `where` is kept)."""
    reason = os_reason(exc)
    need = f" (it needs about {need_bytes / 1e6:.0f} MB)" if need_bytes else ""
    kept = "; the existing folder is unchanged" if where.exists() else ""
    return error(f"cannot write {where}: {reason}; free space{need} or choose another destination "
                 f"(nothing was published{kept})")


def make_temp_dir(final: Path, error: type[Exception]) -> Path:
    """A work folder beside `final` (same filesystem, so publishing is one rename), with the permissions a
    plain mkdir would give rather than mkdtemp's private 0700. Its name carries this process's pid, and folders
    that an earlier run into the same place left behind (its process no longer exists: killed, power cut) are
    removed first. A folder that cannot be made there is `error`, in one line."""
    parent = final.resolve().parent
    recover_interrupted(parent / final.name)
    remove_stale_temp_dirs(parent, final.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise error(f"cannot write to {parent} ({os_reason(exc)}); choose a writable destination") from exc
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the platform or filesystem
    cannot, so the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Put a finished work folder in place of `out`. An existing `out` is swapped with the new folder in one
    atomic exchange where Linux allows it; elsewhere it is renamed aside first, and if the process dies between the
    two renames the next run into the same place (recover_interrupted) puts it back. A failure never leaves
    nothing at `out`."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _owner_gone(pid: str) -> bool:
    """The process that named a leftover folder no longer exists (only where /proc tells)."""
    return pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists()


def recover_interrupted(out: Path) -> None:
    """Undo what a publish killed between its two renames left: the old folder, renamed aside, goes back to `out`
    if nothing took its place; if the new one did get in, the old one is removed."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        if not _owner_gone(old.name.rsplit("-", 1)[-1]):
            continue
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out)


def link_files(src: Path, dest: Path, skip: set[str]) -> None:
    """Hard-link (copy where links are not allowed) every file of `src` into `dest`: a new version of a folder
    whose unchanged files cost no space or time."""
    for path in src.iterdir():
        if path.is_file() and not path.is_symlink() and path.name not in skip:
            try:
                os.link(path, dest / path.name)
            except OSError:
                shutil.copy2(path, dest / path.name)


def remove_stale_temp_dirs(parent: Path, name: str) -> None:
    for path in parent.glob(f".{name}.*.tmp"):
        if _owner_gone(path.name[len(name) + 2 :].split(".", 1)[0]):
            shutil.rmtree(path, ignore_errors=True)


def normalise_permissions(folder: Path) -> None:
    """Files some writers create private (onnx's external data is 0600) get the umask's default mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
