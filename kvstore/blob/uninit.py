"""Evaluated mlx arrays whose memory is not written before the caller fills it.

MLX has no uninitialized allocation in Python (`mx.empty` is `mx.zeros`), and zero-filling a restore's
arrays cost about a quarter of a large restore: MLX's fill runs at ~20 GB/s on one core here, for
memory that preadv then overwrites. MLX's safetensors loader does allocate without writing: it
reads each tensor from a file object into fresh memory with `readinto`. Handing it a file that
serves only a header, and whose `readinto` leaves the buffer as it is, yields uninitialized arrays.

Each loaded tensor is evaluated on its own (~90 us), so arrays are carved out of a few large flat
buffers instead of being loaded one by one. A buffer lives while any array carved from it does, so
only arrays of one lifetime share one (the caller says which: a full-attention layer's arrays are
replaced at its cache's first append, a sliding-window layer's are written in place for as long as
the cache lives), in buffers of at most GROUP_BYTES. If the loader ever stops behaving this way,
arrays come from `mx.zeros` as before: slower, never wrong, because every caller overwrites every
byte (the restore checks that every position landed).

On Linux the buffers are advised into transparent huge pages before anything touches them. In a
process with MLX's default cache limit (32 MiB on Linux) a large restore's memory is fresh from the
kernel every time, and its first touch costs a fault per 4 KiB page; with huge pages it is one
fault per 2 MiB. A 48 MiB qwen restore in such a process took 12,290 faults and ~40 ms of CPU
without the advice, ~540 faults and ~20 ms with it (mlx-lm's load_prompt_cache: ~7,100 and ~24 ms).
Memory the advice reaches keeps it after it is freed; glibc may hand it out again for other uses.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvstore.blob.libc import LIBC
from kvstore.blob.tensorfile import PAGE, numpy_dtype, st_name, writable_view

GROUP_BYTES = 64 << 20  # a qwen-0.5b 4096-token cache (48 MiB) in one buffer: one load instead of three
ZEROS_BELOW = 16 << 20  # smaller requests are zero-filled: carving views costs more than writing them
ALIGN = 64  # every array starts on a cache line: the copies into it stay aligned
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


class _HeaderOnlyFile:
    """A read-only safetensors 'file': a header declaring one uint8 tensor per size, and no data.

    `readinto` past the header reports the bytes as read without touching them.
    """

    name = "kvstore-uninitialized.safetensors"
    closed = False

    def __init__(self, sizes: list[int]):
        header, end = {}, 0
        for i, n in enumerate(sizes):
            header[f"g{i}"] = {"dtype": "U8", "shape": [n], "data_offsets": [end, end + n]}
            end += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        self.head = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.head) + end
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(0, self.size - self.pos))
        if self.pos < len(self.head):
            k = min(n, len(self.head) - self.pos)
            buffer[:k] = self.head[self.pos : self.pos + k]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:  # only the header is ever read through here
        end = self.size if n < 0 else min(self.size, self.pos + n)
        out = self.head[self.pos : end].ljust(max(0, end - self.pos), b"\0")
        self.pos = end
        return out


def _flats(sizes: list[int]) -> list[mx.array] | None:
    """Evaluated uint8 arrays of these sizes, not written; None if MLX's loader does not oblige.

    One load for all: per call the loader costs ~0.2 ms, per tensor ~0.1 ms."""
    try:
        loaded = mx.load(_HeaderOnlyFile(sizes), format="safetensors", stream=mx.cpu)
        flats = [loaded[f"g{i}"] for i in range(len(sizes))]
    except Exception:  # noqa: BLE001 - any loader change means: use the slow, safe path
        return None
    if any(f.dtype != mx.uint8 or tuple(f.shape) != (n,) for f, n in zip(flats, sizes)):
        return None
    for f in flats:
        advise_huge_pages(_address(f), f.nbytes)
    return flats


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back the whole pages of [address, address + nbytes) with transparent huge pages.

    Only advice: where the kernel has them off, or the memory was touched already (a buffer MLX
    recycled), nothing changes and nothing breaks. Returns whether the kernel took the advice.
    """
    if LIBC is None or nbytes < HUGE_PAGE:
        return False
    lo = -(-address // PAGE) * PAGE
    hi = (address + nbytes) // PAGE * PAGE
    return LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE) == 0


def _groups(spans: list[int], lifetimes: list) -> list[list[int]]:
    """Indexes of arrays of one lifetime packed, in order, into buffers of at most GROUP_BYTES (a larger
    array alone)."""
    out = []
    for life in dict.fromkeys(lifetimes):
        group, used = [], 0
        for i, (n, other) in enumerate(zip(spans, lifetimes)):
            if other != life:
                continue
            if group and used + n > GROUP_BYTES:
                out.append(group)
                group, used = [], 0
            group.append(i)
            used += n
        if group:
            out.append(group)
    return out


def _address(a: mx.array) -> int:
    return _address_of(memoryview(a).cast("B"))


def _address_of(flat: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(flat))


@dataclass
class Placed:
    """Memory for one array, written through `host` / `flat` before the mlx array exists (`array()`).

    Making the mlx arrays after the caller's writes saves an evaluation of every view up front
    (~0.5 ms of a 48-array restore): the caller evaluates them once, with the rest of its result.
    """

    host: np.ndarray  # writable, C-contiguous; bf16 as uint16
    flat: memoryview  # host's bytes
    _array: Callable[[], mx.array]

    def array(self) -> mx.array:
        """The mlx array over this memory (lazy: evaluate it before use; no copy is made)."""
        return self._array()


def _placed_from(a: mx.array) -> Placed:
    host, flat = writable_view(a)
    return Placed(host, flat, lambda: a)


def place(
    specs: list[tuple[tuple[int, ...], mx.Dtype]], phases: list[int | None] | None = None, lifetimes: list | None = None
) -> list[Placed]:
    """Memory for C-contiguous arrays of these (shape, dtype)s, in order, with unspecified contents.

    Arrays whose `lifetimes` entries differ never share a buffer (all alike by default).

    phases[i], when given, is where array i should start within a memory page (its address modulo
    PAGE); a multiple of its dtype's size. A caller that reads a file into the array passes the
    file offset its data starts at: the kernel copies from the page cache much faster when source
    and destination lie at the same place within their pages (512 MiB: ~37 ms against ~60 ms here).
    """
    sizes = [math.prod(shape) * dtype.size for shape, dtype in specs]
    phases = phases or [None] * len(specs)
    if sum(sizes) < ZEROS_BELOW:
        out = [mx.zeros(shape, dtype=dtype) for shape, dtype in specs]
        mx.eval(out)  # one evaluation for all: one each costs ~0.1 ms
        return [_placed_from(a) for a in out]
    # Each array's room: its bytes, and slack to move its start to a cache line or to its phase.
    spans = [n + (PAGE if p is not None else ALIGN) for n, p in zip(sizes, phases)]
    groups = _groups(spans, lifetimes or [None] * len(specs))
    flats = _flats([sum(spans[i] for i in group) for group in groups]) if any(sizes) else None
    out: list = [None] * len(specs)
    for g, group in enumerate(groups):
        whole = memoryview(flats[g]).cast("B") if flats is not None else None
        start = _address_of(whole) if whole is not None else 0
        end = 0
        for i in group:
            (shape, dtype), n, phase = specs[i], sizes[i], phases[i]
            at = end + ((phase - start - end) % PAGE if phase is not None else (-(start + end)) % ALIGN)
            end = at + n
            if whole is None or n == 0:
                zeros = mx.zeros(shape, dtype=dtype)
                mx.eval(zeros)
                out[i] = _placed_from(zeros)
                continue
            flat = whole[at : at + n]
            host = np.frombuffer(flat, dtype=numpy_dtype(st_name(dtype))).reshape(shape)
            out[i] = Placed(
                host,
                flat,
                lambda f=flats[g], at=at, n=n, dtype=dtype, shape=shape: f[at : at + n].view(dtype).reshape(shape),
            )
    return out


def empty(
    specs: list[tuple[tuple[int, ...], mx.Dtype]], phases: list[int | None] | None = None, lifetimes: list | None = None
) -> list[mx.array]:
    """Evaluated, C-contiguous arrays of these (shape, dtype)s, in order, with unspecified contents
    (`place`, with the mlx arrays made and evaluated at once)."""
    out = [p.array() for p in place(specs, phases, lifetimes)]
    mx.eval(out)
    return out
