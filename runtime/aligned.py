"""The CUDA target's batch layout: rows left-aligned in the cache (cache index = position), masks right-padded.

onnxruntime's CUDA GroupQueryAttention masks by lengths alone (seqlens_k = a row's real tokens - 1, no bias), so
row b's keys must sit at cache indices 0 .. length_b - 1 (reference/lengths.py is the kernel's contract). Here a
prompt batch is right-padded, each step writes a row's token at its own length, and a row that joins or leaves
moves as a whole row: no column shift, and keys rotated inside the kernel never need re-rotating (their index is
their position wherever the row sits).
"""

from __future__ import annotations


import numpy as np

from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.runtime.backend import OrtBackend
from neodeploy.runtime.batch import DecodeBatch


def align_left(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (input_ids, attention_mask) -> the same rows left-aligned and right-padded (pads keep their ids)."""
    ids, mask = ids.copy(), mask.copy()
    for row in range(ids.shape[0]):
        pad = int(mask.shape[1] - mask[row].sum())
        ids[row], mask[row] = np.roll(ids[row], -pad), np.roll(mask[row], -pad)
    return ids, mask


def lengths_mask(lengths: np.ndarray) -> np.ndarray:
    """The right-padded mask [rows, max length] of rows holding `lengths` real tokens."""
    width = int(lengths.max()) if len(lengths) else 0
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------- the cache pool

class AlignedPool:
    """One zeroed [rows, heads, capacity, head_dim] buffer per past input on the session's device, bound by address
    as both past and present (GroupQueryAttention writes each step's keys into it at the row's length), of which
    the first `rows` rows are the batch. Zeroed, not left uninitialised: keys past a row's length are never
    attended, but a fused kernel still multiplies them by a zero probability, and 0 x NaN is NaN."""

    def __init__(self, ort, device: str, count: int, shape: tuple[int, int, int, int], dtype):
        self.device, self.dtype, self.shape = device, np.dtype(dtype), shape
        self.rows = shape[0]
        zeros = [np.zeros(shape, dtype=dtype) for _ in range(count)]
        # On the CPU an OrtValue wraps the array (no copy): `host` are the same bytes, as numpy views.
        self.host = zeros if device == "cpu" else None
        self.values = [ort.OrtValue.ortvalue_from_numpy(z, device, 0) for z in zeros]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def address(self, index: int, row: int = 0) -> int:
        _, heads, capacity, dim = self.shape
        return self.values[index].data_ptr() + row * heads * capacity * dim * self.dtype.itemsize

    def bind(self, binding, names: list[str], output: bool, row: int = 0, rows: int | None = None) -> None:
        shape = [self.rows if rows is None else rows, *self.shape[1:]]
        for i, name in enumerate(names):
            bind = binding.bind_output if output else binding.bind_input
            bind(name, self.device, 0, self.dtype, shape, self.address(i, row))


# export.cuda.copy_rows_graph's bytes (tests/test_cuda_target.py rebuilds them with onnx): the runtime imports no onnx.
COPY_ROWS_GRAPH = {
    "float16": "CAo6pQIKKBIEemVybyIIQ29uc3RhbnQqFgoFdmFsdWUqCggBEAc6AQBCAXqgAQQKKBIEYXhpcyIIQ29uc3RhbnQqFgoFdmFsdWUqCggBEAc6AQJCAWGgAQQKIwoBeAoEemVybwoFd2lkdGgKBGF4aXMSBGtlcHQiBVNsaWNlChYKBGtlcHQKBHBhZHMSA291dCIDUGFkEgljb3B5X3Jvd3NaLQoBeBIoCiYIChIiCgYSBHJvd3MKBxIFaGVhZHMKCBIGc291cmNlCgUSA2RpbVoTCgV3aWR0aBIKCggIBxIECgIIAVoSCgRwYWRzEgoKCAgHEgQKAggIYi8KA291dBIoCiYIChIiCgYSBHJvd3MKBxIFaGVhZHMKCBIGdGFyZ2V0CgUSA2RpbUIECgAQEg==",
    "float32": "CAo6pQIKKBIEemVybyIIQ29uc3RhbnQqFgoFdmFsdWUqCggBEAc6AQBCAXqgAQQKKBIEYXhpcyIIQ29uc3RhbnQqFgoFdmFsdWUqCggBEAc6AQJCAWGgAQQKIwoBeAoEemVybwoFd2lkdGgKBGF4aXMSBGtlcHQiBVNsaWNlChYKBGtlcHQKBHBhZHMSA291dCIDUGFkEgljb3B5X3Jvd3NaLQoBeBIoCiYIARIiCgYSBHJvd3MKBxIFaGVhZHMKCBIGc291cmNlCgUSA2RpbVoTCgV3aWR0aBIKCggIBxIECgIIAVoSCgRwYWRzEgoKCAgHEgQKAggIYi8KA291dBIoCiYIARIiCgYSBHJvd3MKBxIFaGVhZHMKCBIGdGFyZ2V0CgUSA2RpbUIECgAQEg==",
}


class AlignedBackend(OrtBackend):
    """onnxruntime on a --target cuda artifact: one AlignedPool per batch, bound by address as past and present, so
    no step allocates or copies cache and only the [batch, vocab] logits reach the host. Rows move between pools
    (a joining row, a leaving one, a prefix cache's keys) through a small copy graph on the same provider. On the
    CPU (tests: providers=["CPUExecutionProvider"]) the same bindings run onnxruntime's CPU kernel."""

    aligned = True
    joinable = True

    def __init__(self, model_path, num_layers, num_heads, head_dim, kv_dtype, providers=None, threads=None):
        # No kernel_rotary: rotary happens at the position, which is the cache index wherever the row sits.
        super().__init__(model_path, num_layers, num_heads, head_dim, kv_dtype, providers, threads, logits="last")
        self.in_place = True  # on CUDA too: the pool lives on the device
        import base64

        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        graph = base64.b64decode(COPY_ROWS_GRAPH[np.dtype(kv_dtype).name])
        self._copier = self._ort.InferenceSession(graph, options, providers=self.providers)

    def new_cache(self, rows, capacity):
        return AlignedPool(self._ort, self.device, len(self.past_names), (rows, self.num_heads, capacity, self.head_dim),
                           self.kv_dtype)

    def _run(self, ids, mask, pos, pool, all_positions=False):
        if mask.shape[1] > pool.capacity:
            self._grow(pool, mask.shape[1])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        pool.bind(binding, self.past_names, output=False)
        binding.bind_output("logits")  # host: [batch, 1, vocab], the last real position of each row (output 0)
        pool.bind(binding, self.present_names, output=True)
        self.session.run_with_iobinding(binding)
        return np.ascontiguousarray(binding.get_outputs()[0].numpy()[:, -1, :], dtype=np.float32), pool

    def score(self, input_ids, attention_mask, position_ids):
        raise UsageError("a --target cuda graph returns last-position logits only; score() needs an export with "
                         "--target portable --logits all")

    def wrap_cache(self, arrays):
        raise UsageError("a --target cuda cache lives in its pool; use load_rows")  # in_place: DecodeBatch never calls it

    # ------------------------------------------------------------------------------------------------ rows

    def _copy(self, source, source_row: int, rows: int, target, target_row: int, width: int) -> None:
        """target rows [target_row, + rows) := source rows [source_row, + rows), columns [0, width) (the rest zero)."""
        if rows == 0:
            return
        width = min(width, source.capacity, target.capacity)
        pads = np.array([0, 0, 0, 0, 0, 0, target.capacity - width, 0], np.int64)
        for i in range(len(self.past_names)):
            binding = self._copier.io_binding()
            binding.bind_input("x", source.device, 0, source.dtype, [rows, *source.shape[1:]], source.address(i, source_row))
            binding.bind_cpu_input("width", np.array([width], np.int64))
            binding.bind_cpu_input("pads", pads)
            binding.bind_output("out", target.device, 0, target.dtype, [rows, *target.shape[1:]],
                                target.address(i, target_row))
            self._copier.run_with_iobinding(binding)

    def _grow(self, pool: AlignedPool, total: int) -> None:
        """Past the capacity a caller asked for: a pool twice as wide (one copy), in the same object."""
        wider = self.new_cache(pool.shape[0], max(total, 2 * pool.capacity))
        self._copy(pool, 0, pool.shape[0], wider, 0, pool.capacity)
        pool.shape, pool.host, pool.values = wider.shape, wider.host, wider.values  # rows, device, dtype stay

    def copy_rows(self, source: AlignedPool, target: AlignedPool, at: int, width: int) -> None:
        """A joining batch: all of source's rows into target's rows at, at + 1, ... (no column moves)."""
        self._copy(source, 0, source.rows, target, at, width)

    def move_rows(self, pool: AlignedPool, moves: list[tuple[int, int]], width: int) -> None:
        """Rows leaving: row `source` to row `target` for each (target, source), as one simultaneous move."""
        if all(t < s for t, s in moves) and all(a[1] < b[1] for a, b in zip(moves, moves[1:])):
            for target, source in moves:  # ascending, each to a lower row: none is overwritten before it moves
                self._copy(pool, source, 1, pool, target, width)
            return
        staged = self.new_cache(len(moves), pool.capacity)
        for k, (_, source) in enumerate(moves):
            self._copy(pool, source, 1, staged, k, width)
        for k, (target, _) in enumerate(moves):
            self._copy(staged, k, 1, pool, target, width)

    def load_rows(self, pool: AlignedPool, arrays: list[np.ndarray]) -> None:
        """Host arrays [rows, heads, m, head_dim] (a prefix cache's) into the pool's first rows."""
        rows, width = arrays[0].shape[0], arrays[0].shape[2]
        pads = np.array([0, 0, 0, 0, 0, 0, pool.capacity - width, 0], np.int64)
        for i, array in enumerate(arrays):
            binding = self._copier.io_binding()
            binding.bind_cpu_input("x", np.ascontiguousarray(array, dtype=pool.dtype))
            binding.bind_cpu_input("width", np.array([width], np.int64))
            binding.bind_cpu_input("pads", pads)
            binding.bind_output("out", pool.device, 0, pool.dtype, [rows, *pool.shape[1:]], pool.address(i))
            self._copier.run_with_iobinding(binding)

    def cache_arrays(self, state, rows, width):
        """Host arrays [rows, heads, width, head_dim]: views of the pool on the CPU, copies from a CUDA pool."""
        if state.host is not None:
            return [a[:rows, :, :width] for a in state.host]
        return [v.numpy()[:rows, :, :width] for v in state.values]


# ----------------------------------------------------------------------------------------------------- the batch

class AlignedBatch(DecodeBatch):
    """DecodeBatch in this layout (DecodeBatch(backend) is one of these when backend.aligned): the mask is always
    `lengths_mask(lengths)`, each fed token lands at its row's length, and rows join or leave as whole rows."""

    def start(self, ids, mask, capacity, chunk=None):
        return super().start(*align_left(ids, mask), capacity, chunk)

    def _load(self, past, capacity):
        self.state = self.backend.new_cache(past.rows, capacity)
        self.backend.load_rows(self.state, past.arrays())

    def _feed(self, ids, run):
        n = ids.shape[1]
        lengths = self.lengths + n
        mask = lengths_mask(lengths)
        logits, self.state = run(ids, mask, self.lengths[:, None] + np.arange(n), self.state)
        self.mask, self.lengths = mask, lengths
        return logits

    def step(self, tokens):
        return self._feed(np.asarray(tokens, dtype=np.int64).reshape(-1, 1), self.backend.decode)

    def rollback(self, count):
        if count > 0:
            self.lengths = self.lengths - count
            self.mask = lengths_mask(self.lengths)

    def row_cache(self, row):
        return [np.array(a[row : row + 1, :, : int(self.lengths[row])])
                for a in self.backend.cache_arrays(self.state, self.rows, self.width)]

    def join(self, other):
        if other.rows == 0:
            return
        if self.rows == 0 and self.capacity_rows == 0:
            self.mask, self.lengths, self.state = other.mask, other.lengths, other.state
            return
        n, m = self.rows, other.rows
        width = max(self.width, other.width)
        if self.capacity_rows:
            if n + m > self.capacity_rows or width >= self.capacity:
                raise UsageError(f"the batch pool ({self.capacity_rows} rows x {self.capacity} tokens) is full")
            if self.state is None:
                self.state = self.backend.new_cache(self.capacity_rows, self.capacity)
        else:  # a batch of its own: a new pool that holds both
            pool = self.backend.new_cache(n + m, max(self.state.capacity, other.state.capacity))
            self.backend.copy_rows(self.state, pool, 0, self.width)
            self.state = pool
        self.backend.copy_rows(other.state, self.state, n, other.width)
        self.backend.set_rows(self.state, n + m)
        self.lengths = np.concatenate([self.lengths, other.lengths])
        self.mask = lengths_mask(self.lengths)

    def keep(self, rows):
        rows = np.asarray(list(rows), dtype=np.int64)
        if len(rows) == self.rows and (rows == np.arange(self.rows)).all():
            return
        width = self.width
        self.lengths = self.lengths[rows]
        self.mask = lengths_mask(self.lengths)
        if not len(rows) and not self.capacity_rows:
            self.state = None
        elif self.state is not None:
            moves = [(i, int(r)) for i, r in enumerate(rows) if i != r]
            if moves:
                self.backend.move_rows(self.state, moves, width)
            self.backend.set_rows(self.state, len(rows))


def check_cuda(artifact, providers: list[str] | None) -> None:
    """A --target cuda artifact loads where onnxruntime has CUDAExecutionProvider, or where the caller names the
    providers itself (tests run it on the CPU's kernel with providers=["CPUExecutionProvider"])."""
    import onnxruntime as ort

    if providers is None and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ArtifactError(f"{artifact} is a --target cuda export and this onnxruntime has no CUDAExecutionProvider; "
                            "run it on a CUDA machine with onnxruntime-gpu, or re-export with --target portable")
