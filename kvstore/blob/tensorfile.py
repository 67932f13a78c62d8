"""Safetensors bytes to and from arrays without temporary copies.

The blob store hashes the exact bytes it writes, so files are built here rather than by
`mx.save_safetensors`. Writing takes numpy views of the cache's own memory and emits one buffer
per contiguous block (no gather copy); reading scatters a file's tensor data straight into the
destination arrays with `preadv`. bfloat16 travels as uint16 (numpy has no bf16).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import struct
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvstore.errors import CorruptBlobError

_TO_ST = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.int64: "I64",
    mx.uint64: "U64",
    mx.bool_: "BOOL",
    mx.float64: "F64",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
_NP = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "U32": np.uint32,
    "I32": np.int32,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "I64": np.int64,
    "U64": np.uint64,
    "BOOL": np.bool_,
    "F64": np.float64,
}
HEADER_PROBE = 16384  # one read gets a chunk blob's header (and its padding) for models of up to ~100 layers
PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20  # data sections of at least this many bytes start on a page


@dataclass(slots=True)  # not frozen: a frozen init costs 0.8 us against 0.16, and a save makes 768
class HostArray:
    """A numpy view (any strides) of array memory, and its safetensors dtype; or, with `hi` set, only
    positions [lo, hi) of its second-to-last axis.

    `flat`, when known, is the bytes of `data`, which is then C-contiguous: a save's pieces are cut
    from it by offset, with no numpy indexing (a 4,096-token qwen save's 1,536 blocks: 3.5 ms through
    numpy views, 0.75 ms by offset).
    """

    data: np.ndarray
    dtype: str
    flat: memoryview | None = None
    lo: int = 0
    hi: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.data.shape
        return shape if self.hi is None else (*shape[:-2], self.hi - self.lo, shape[-1])

    @property
    def nbytes(self) -> int:
        if self.hi is None:
            return self.data.nbytes
        positions = self.data.shape[-2]
        return self.data.nbytes // positions * (self.hi - self.lo) if positions else 0

    def positions(self, a: int, b: int) -> HostArray:
        """Positions [a, b) of the second-to-last axis (of the positions already chosen)."""
        return HostArray(self.data, self.dtype, self.flat, self.lo + a, self.lo + b)

    def view(self) -> np.ndarray:
        return self.data if self.hi is None else self.data[..., self.lo : self.hi, :]

    def blocks(self) -> list[memoryview]:
        """The bytes in C order as a few contiguous buffers (views, not copies): `blocks`."""
        flat, lo, hi = self.flat, self.lo, self.hi
        if flat is None:
            return blocks(self.view())
        if hi is None:
            return [flat] if len(flat) else []
        positions, width = self.data.shape[-2:]
        row = width * self.data.itemsize
        step = positions * row
        if lo == hi or step == 0:
            return []
        if lo == 0 and hi == positions:
            return [flat]
        begin, end = lo * row, hi * row
        return [flat[o + begin : o + end] for o in range(0, len(flat), step)]


def st_name(dtype: mx.Dtype) -> str:
    """The safetensors name of an mlx dtype."""
    if dtype not in _TO_ST:
        raise TypeError(f"dtype {dtype} cannot be stored")
    return _TO_ST[dtype]


def st_dtype(a: mx.array) -> str:
    """The safetensors name of an array's dtype."""
    return st_name(a.dtype)


def numpy_dtype(st: str):
    """The numpy dtype that holds a safetensors dtype's bytes (bf16 as uint16)."""
    return _NP[st]


def host(a: mx.array) -> HostArray:
    """A zero-copy numpy view of an evaluated mlx array (bf16 viewed as uint16).

    Through the buffer protocol where the array is C-contiguous, its own memory (a save takes
    dozens at once: the uint16 view numpy needs otherwise is an MLX op and an evaluation each)."""
    st = st_dtype(a)
    try:
        view, flat = writable_view(a)
    except (BufferError, TypeError):  # a strided view MLX made without copying
        return HostArray(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a), st)
    return HostArray(view, st, flat)


def blocks(a: np.ndarray) -> list[memoryview]:
    """The array's bytes in C order as a few contiguous buffers (views, not copies)."""
    if a.size == 0:
        return []
    if a.flags.c_contiguous:
        return [memoryview(a).cast("B")]
    # Find the innermost run of dims that is contiguous, and iterate the dims outside it.
    shape, strides = a.shape, a.strides
    inner = a.ndim
    expected = a.itemsize
    while inner > 0 and (shape[inner - 1] == 1 or strides[inner - 1] == expected):
        expected *= shape[inner - 1]
        inner -= 1
    if inner == a.ndim:
        return [memoryview(np.ascontiguousarray(a)).cast("B")]
    # (itertools, not np.ndindex: a save splits ~50 arrays a blob, and ndindex costs more than the views)
    return [memoryview(a[idx]).cast("B") for idx in itertools.product(*map(range, shape[:inner]))]


def encode(arrays: dict[str, HostArray | mx.array], metadata: dict[str, str] | None = None) -> list:
    """Safetensors file contents as a list of buffers: the header, then each tensor's blocks."""
    layout = []
    datas: list = []
    for name in sorted(arrays):
        a = arrays[name]
        if isinstance(a, mx.array):
            a = host(a)
        layout.append((name, a.dtype, a.shape, a.nbytes))
        datas.extend(a.blocks())
    meta = tuple((str(k), str(v)) for k, v in metadata.items()) if metadata else ()
    # The data section starts on a page when it is large (padding then costs at most 0.4 %): a
    # restore places each array as its data lies in the file, and page-aligned copies out of the page
    # cache run ~1.5x as fast as misaligned ones here. Otherwise on 8 bytes, as safetensors does.
    align = PAGE if sum(entry[3] for entry in layout) >= PAGE_ALIGN_FROM else 8
    return [_header(tuple(layout), meta, align), *datas]


@functools.lru_cache(maxsize=256)
def _header(
    layout: tuple[tuple[str, str, tuple[int, ...], int], ...], meta: tuple[tuple[str, str], ...], align: int
) -> bytes:
    """The header of a file of tensors (name, dtype, shape, bytes) in this order, with this metadata, its data
    starting on a multiple of `align`: its length, its JSON and the padding. The blobs of a save's full
    chunks all have one (~0.3 ms a blob to build: a 4,096-token save writes 16)."""
    header: dict = {}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if meta:
        header["__metadata__"] = dict(meta)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw


def parse_header(data: bytes | bytearray | memoryview, blob_id: str = "?") -> tuple[int, dict, dict]:
    """(data start, tensor entries, metadata) of a safetensors file's first bytes."""
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        if n > 100_000_000:
            raise ValueError("header length is implausible")
        header = json.loads(bytes(data[8 : 8 + n]))
        metadata = header.pop("__metadata__", {}) or {}
        for info in header.values():
            if info["dtype"] not in _NP:
                raise ValueError(f"unknown dtype {info['dtype']}")
        return 8 + n, header, metadata
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptBlobError(f"blob {blob_id} does not parse as safetensors: {e}", blob_id) from e


def decode(data: bytes | bytearray, blob_id: str = "?") -> tuple[dict[str, mx.array], dict[str, str]]:
    """Arrays (copied into mlx) and metadata from safetensors bytes."""
    base, header, metadata = parse_header(data, blob_id)
    arrays = {}
    try:
        for name, info in header.items():
            st = info["dtype"]
            begin, end = info["data_offsets"]
            count = (end - begin) // np.dtype(_NP[st]).itemsize
            if base + end > len(data) or count != int(np.prod(info["shape"], dtype=np.int64)):
                raise ValueError("tensor data does not fit the file")
            view = np.frombuffer(data, dtype=_NP[st], count=count, offset=base + begin)
            arr = mx.array(view.reshape(info["shape"]))
            arrays[name] = arr.view(mx.bfloat16) if st == "BF16" else arr
    except (ValueError, TypeError) as e:
        raise CorruptBlobError(f"blob {blob_id} does not parse as safetensors: {e}", blob_id) from e
    return arrays, metadata


def mlx_dtype(st: str):
    return _FROM_ST[st]


def writable_view(a: mx.array) -> tuple[np.ndarray, memoryview]:
    """Writable views of a freshly evaluated mlx array this code alone holds: a numpy array (bf16 as
    uint16) and its flat bytes. Reads scatter file bytes straight into a new cache's memory this way.

    Both come from one byte view of the mlx array: a memoryview of the numpy array, cast to bytes,
    costs ~40 us an array, as much as reading 200 KiB.
    """
    flat = memoryview(a).cast("B")
    return np.frombuffer(flat, dtype=_NP[st_dtype(a)]).reshape(a.shape), flat


IOV_MAX = 1024  # POSIX's usual limit on buffers per preadv/writev call


def read_into(fd: int, offset: int, dests: list[memoryview]) -> int:
    """preadv into dests from offset, looping on short reads and IOV_MAX; returns the bytes read."""
    got, i = 0, 0
    while i < len(dests):
        batch = dests[i : i + IOV_MAX]
        n = os.preadv(fd, batch, offset + got) if hasattr(os, "preadv") else _pread_loop(fd, batch, offset + got)
        if n <= 0:
            break
        got += n
        while i < len(dests) and n >= len(dests[i]):
            n -= len(dests[i])
            i += 1
        if n:  # a short read ended inside dests[i]: carry on from there
            dests = [dests[i][n:], *dests[i + 1 :]]
            i = 0
    return got


WRITE_BYTES = 1 << 20  # data per writev call


def write_all(fd: int, buffers: list, hasher=None) -> int:
    """writev every buffer (returns the bytes written), about WRITE_BYTES a call, looping on short writes; with a `hasher`, each
    call's bytes are hashed just before they are written (in order: the hash is the file's).

    Calls of ~1 MiB, not one call per IOV_MAX buffers (a whole 32 MiB blob): on this Linux VM two
    threads each writing 32 MiB to a new file in one call took 83 ms, and in 1 MiB calls 9.5 ms.
    """
    views = []
    for b in buffers:
        v = memoryview(b).cast("B")
        views.extend(v[o : o + WRITE_BYTES] for o in range(0, len(v), WRITE_BYTES))
    i = hashed = 0
    total = sum(memoryview(b).nbytes for b in buffers)
    while i < len(views):
        j, size = i, 0
        while j < len(views) and j - i < IOV_MAX and (size == 0 or size + len(views[j]) <= WRITE_BYTES):
            size += len(views[j])
            j += 1
        if hasher is not None:
            for k in range(hashed, j):
                hasher.update(views[k])
            hashed = j
        n = os.writev(fd, views[i:j]) if hasattr(os, "writev") else os.write(fd, views[i])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:  # a short write ended inside views[i]
            views[i] = views[i][n:]
    return total


def _pread_loop(fd: int, dests: list[memoryview], offset: int) -> int:
    n = 0
    for d in dests:
        chunk = os.pread(fd, len(d), offset + n)
        d[: len(chunk)] = chunk
        n += len(chunk)
        if len(chunk) < len(d):
            break
    return n
