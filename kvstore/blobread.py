"""Scatter-reads of chunk blobs straight into a new cache's arrays, verified as they land.

A layer's keys are one (1, heads, tokens, dim) array; a chunk blob holds one run of positions of
several layers. Each blob is read with `preadv` into the destination slices of every layer it
holds, skipping decode-then-concatenate copies (restore speed is the product's speed); the hash is
taken over the bytes where they landed, so nothing unverified is ever returned.
"""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import xxhash

from .errors import CorruptBlobError, MissingBlobError
from .tensorfile import HEADER_PROBE, _NP, blocks, mlx_dtype, parse_header, read_into, writable_view


def _corrupt(blob_id: str, agent: str | None, why: str) -> CorruptBlobError:
    who = f" (needed by agent {agent!r})" if agent else ""
    return CorruptBlobError(f"blob {blob_id} is corrupt: {why}{who}", blob_id, agent)


@dataclass
class _Planned:
    """One blob's header, and the slots it fills with which positions."""

    blob_id: str
    size: int
    head: bytes
    base: int
    header: dict
    uses: dict[int, int] = field(default_factory=dict)  # slot -> first position held in the file
    _by_slot: dict[int, dict[str, dict]] | None = None

    def by_slot(self) -> dict[int, dict[str, dict]]:
        """Header entries grouped by layer: '3.k' -> {3: {'k': ...}} (grouped once per blob)."""
        if self._by_slot is None:
            out: dict[int, dict[str, dict]] = {}
            for name, info in self.header.items():
                slot, _, arr = name.partition(".")
                if slot.isdigit():
                    out.setdefault(int(slot), {})[arr] = info
            self._by_slot = out
        return self._by_slot


def _position_runs(flat: memoryview, shape: tuple[int, ...], itemsize: int, start: int, length: int) -> list:
    """The bytes of positions [start, start + length) of a C-contiguous (..., positions, dim) array, as
    one memoryview per leading index (one in all when the range covers every position): slices of
    `flat`, the array's bytes, so nothing is copied."""
    positions, row = shape[-2], shape[-1] * itemsize
    if start == 0 and length == positions:
        return [flat]
    step = positions * row
    lo, hi = start * row, (start + length) * row
    return [flat[o * step + lo : o * step + hi] for o in range(len(flat) // step if step else 0)]


HASH_BATCH = 512 << 10  # bytes read per preadv, then hashed at once while they are in the CPU's cache


def _batches(buffers: list, limit: int):
    """Consecutive runs of `buffers` of about `limit` bytes (a longer buffer is split into slices)."""
    batch, size = [], 0
    for b in buffers:
        while len(b) > limit - size:
            take = limit - size
            batch.append(b[:take])
            yield batch
            batch, size, b = [], 0, b[take:]
        if len(b):
            batch.append(b)
            size += len(b)
    if batch:
        yield batch


PARALLEL_BYTES = 32 << 20  # below this, thread start-up costs more than overlapping the reads saves


class ScatterReader:
    """Builds the positional slots' arrays: slot -> (origin, total positions) from the blobs given."""

    def __init__(self, blob_path, spans: dict[int, tuple[int, int]], agent: str | None, threads: int = 2):
        self.blob_path = blob_path
        self.spans = spans
        self.agent = agent
        self.threads = threads
        self.arrays: dict[int, dict[str, mx.array]] = {}
        self.views: dict[int, dict[str, np.ndarray]] = {}
        self.flat: dict[int, dict[str, memoryview]] = {}  # the same arrays' bytes, for _position_runs
        self.plans: dict[str, _Planned] = {}
        self.first_plan: dict[int, _Planned] = {}

    def _open(self, blob_id: str) -> int:
        try:
            return os.open(self.blob_path(blob_id), os.O_RDONLY)
        except FileNotFoundError:
            who = f" (needed by agent {self.agent!r})" if self.agent else ""
            raise MissingBlobError(f"blob {blob_id} is missing{who}", blob_id, self.agent) from None

    def add(self, blob_id: str, slot: int, file_from: int) -> None:
        """Note that `slot`'s positions from file_from are in this blob (reads its header once)."""
        plan = self.plans.get(blob_id)
        if plan is None:
            fd = self._open(blob_id)
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, HEADER_PROBE, 0)
                if len(head) >= 8:
                    (n,) = struct.unpack_from("<Q", head, 0)
                    if 8 + n > len(head) and n < size:
                        head = os.pread(fd, 8 + n, 0)
            finally:
                os.close(fd)
            if len(head) < 8:
                raise _corrupt(blob_id, self.agent, "it is truncated")
            base, header, _meta = parse_header(head, blob_id)
            plan = self.plans[blob_id] = _Planned(blob_id, size, head[:base], base, header)
        plan.uses[slot] = file_from
        if slot not in self.first_plan:
            self.first_plan[slot] = plan

    def _allocate(self) -> None:
        """Every slot's arrays, shaped from the first blob naming it, in one evaluation."""
        pending = {}
        for slot, plan in self.first_plan.items():
            origin, total = self.spans[slot]
            by_slot = plan.by_slot()
            if slot not in by_slot:
                raise _corrupt(plan.blob_id, self.agent, f"it holds no tensors of layer {slot}")
            self.arrays[slot] = {}
            for name, info in by_slot[slot].items():
                shape = list(info["shape"])
                shape[-2] = total
                self.arrays[slot][name] = pending[(slot, name)] = mx.zeros(shape, dtype=mlx_dtype(info["dtype"]))
        mx.eval(list(pending.values()))
        for (slot, name), a in pending.items():
            view = self.views.setdefault(slot, {})[name] = writable_view(a)
            self.flat.setdefault(slot, {})[name] = memoryview(view).cast("B")

    def run(self) -> dict[int, dict[str, mx.array]]:
        """Read every planned blob and return slot -> arrays (threads for large restores: cold reads overlap)."""
        self._allocate()
        plans = list(self.plans.values())
        if self.threads > 1 and len(plans) > 1 and sum(p.size for p in plans) >= PARALLEL_BYTES:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                list(pool.map(self._fill, plans))
        else:
            for p in plans:
                self._fill(p)
        return self.arrays

    def _fill(self, plan: _Planned) -> None:
        buffers, scratch, expected = [], [], 0
        for name, info in sorted(plan.header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            shape = info["shape"]
            slot_s, _, arr = name.partition(".")
            if begin != expected or not slot_s.isdigit():
                raise _corrupt(plan.blob_id, self.agent, "its tensor layout is not a chunk blob's")
            expected = end
            slot = int(slot_s)
            view = self.views.get(slot, {}).get(arr) if slot in plan.uses else None
            if view is None:  # a layer of this blob the restore does not need: land it aside for the hash
                tmp = np.empty(max(0, end - begin), dtype=np.uint8)
                buffers.extend(blocks(tmp))
                continue
            origin, total = self.spans[slot]
            file_from = plan.uses[slot]
            length = shape[-2] if shape else 0
            cut = max(0, origin - file_from)
            dest = file_from + cut - origin
            if (len(shape) != view.ndim or shape[:-2] != list(view.shape[:-2]) or shape[-1] != view.shape[-1]
                    or _NP[info["dtype"]] != view.dtype or length < cut or dest + length - cut > total
                    or end - begin != math.prod(shape) * view.itemsize):
                raise _corrupt(plan.blob_id, self.agent, f"its layer {slot} does not fit the cache")
            if cut == 0:
                buffers.extend(_position_runs(self.flat[slot][arr], view.shape, view.itemsize, dest, length))
            else:  # the window starts inside this chunk: land it aside, keep the tail
                tmp = np.empty(shape, dtype=view.dtype)
                scratch.append((view, dest, tmp[..., cut:, :]))
                buffers.extend(blocks(tmp))
        if plan.base + expected != plan.size:
            raise _corrupt(plan.blob_id, self.agent, f"it is {plan.size} bytes, its header says {plan.base + expected}")
        h = xxhash.xxh3_128(plan.head)
        fd = self._open(plan.blob_id)
        try:
            got = 0
            for batch in _batches(buffers, HASH_BATCH):
                n = read_into(fd, plan.base + got, batch)
                got += n
                if n != sum(len(b) for b in batch):
                    break
                for b in batch:  # hashed while still in the CPU cache: no second trip through memory
                    h.update(b)
        finally:
            os.close(fd)
        if got != expected:
            raise _corrupt(plan.blob_id, self.agent, "it is shorter than its header says")
        if h.hexdigest() != plan.blob_id:
            raise _corrupt(plan.blob_id, self.agent, "its bytes no longer match its hash")
        for view, dest, kept in scratch:
            view[..., dest : dest + kept.shape[-2], :] = kept
