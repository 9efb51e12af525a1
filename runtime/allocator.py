"""glibc's allocator tuned for a server that allocates and frees the same buffers many times a second.

Each new request gets its own KV cache (24 arrays of ~1.6 MB for one pythia-160m row of 529 tokens) that is
copied into the engine's pool and freed within milliseconds. glibc serves every allocation of that size with a
fresh mmap and returns it to the kernel when freed, so each request faulted ~9,500 pages in again: a prefix hit's
cache took 16 ms to make inside `serve` against 6 ms with this tuning (shared-prefix first token p50, 4 clients:
110-132 ms against 81-85 ms; docs/benchmarks.md). vLLM's CPU build preloads tcmalloc for the same reason; this
needs no preload, and changes nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: below it, allocations come from the heap
TRIM_THRESHOLD = 512 << 20  # freed heap kept for reuse before any is handed back to the kernel


def retain_freed_memory() -> bool:
    """Serve allocations under 32 MiB from the heap and keep up to 512 MiB of freed heap in the process, so a
    buffer freed at one step is reused at the next instead of faulted in again. Process-wide: `serve` calls it at
    start; an application embedding the Engine may call it too. False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators are left alone
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
