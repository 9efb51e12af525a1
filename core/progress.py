"""Live progress for long stages (stage, step counts, elapsed) through tqdm, on a terminal only.

Quiet when stderr is not a terminal (CI logs, pipes), with `--quiet` / NEODEPLOY_QUIET=1, or without tqdm: the
start and end lines the commands print stay either way; only the live line is added.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    if _quiet or os.environ.get("NEODEPLOY_QUIET") or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def live(desc: str, total: int | None = None, unit: str = "step"):
    """A live line for `desc`: counts `update()` calls against `total` (or just the elapsed time, refreshed twice a
    second, when the stage has no steps to count, e.g. a trace in a child process)."""
    if not enabled():
        yield _Null()
        return
    from tqdm import tqdm

    fmt = "{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}]" if total else "{desc}: {elapsed}"
    bar = tqdm(total=total, desc=f"  {desc}", unit=unit, bar_format=fmt, leave=False, file=sys.stderr,
               dynamic_ncols=True)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        ticker.join()
        bar.close()
