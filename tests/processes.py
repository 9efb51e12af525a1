"""Process helpers the tests share, with no heavy imports (tests/ray_driver.py runs them in its own namespace):
the neodeploy CLI in a subprocess, a free loopback port, and Linux /proc lookups for the kill tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def cli(*args, check: bool = False, timeout: float = 300, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`neodeploy ARGS...` as a user runs it (python -m neodeploy), text in and out; check: exit 0 or fail with stderr."""
    proc = subprocess.run([sys.executable, "-m", "neodeploy", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below pid (children of children included), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
