"""Small filesystem helpers every stage uses: atomic work folders, permissions, hashes. Torch-free."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_destination(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """A new folder may be created at `out` (or replaced, with overwrite): refuse before any work is done."""
    if out.exists() and not overwrite:
        raise error(f"{out} already exists; choose another folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; choose another destination")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise error(f"parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise error(f"cannot write to {parent}; choose a writable destination")


def make_temp_dir(final: Path) -> Path:
    """A work folder beside `final` (same filesystem, so publishing is one rename), with the permissions a
    plain mkdir would give rather than mkdtemp's private 0700. Its name carries this process's pid, and folders
    that an earlier run into the same place left behind (its process no longer exists: killed, power cut) are
    removed first."""
    parent = final.resolve().parent
    remove_stale_temp_dirs(parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished work folder into place; an existing `out` goes only once the new one is in (and is put
    back if the rename fails), so a failure never leaves nothing."""
    import shutil

    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def remove_stale_temp_dirs(parent: Path, name: str) -> None:
    import shutil

    for path in parent.glob(f".{name}.*.tmp"):
        pid = path.name[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(path, ignore_errors=True)


def normalise_permissions(folder: Path) -> None:
    """Files some writers create private (onnx's external data is 0600) get the umask's default mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
