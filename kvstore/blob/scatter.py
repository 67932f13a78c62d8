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
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx
import numpy as np
import xxhash

from kvstore.blob import uninit
from kvstore.blob.iopool import CORES, IoPool
from kvstore.blob.local import open_blob
from kvstore.blob.tensorfile import (
    HEADER_PROBE,
    PAGE,
    blocks,
    mlx_dtype,
    parse_header,
    read_into,
    st_name,
)
from kvstore.errors import CorruptBlobError, StoreError


def _corrupt(blob_id: str, agent: str | None, why: str) -> CorruptBlobError:
    who = f" (needed by agent {agent!r})" if agent else ""
    return CorruptBlobError(f"blob {blob_id} is corrupt: {why}{who}", blob_id, agent)


@dataclass(frozen=True)
class _Layout:
    """A chunk blob's header, parsed: its tensors in file order as (begin, end, slot, array, dtype, shape)."""

    head: bytes
    base: int
    entries: tuple[tuple[int, int, int, str, str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return self.base + (self.entries[-1][1] if self.entries else 0)

    @cached_property  # once per layout: a restore asks it for every layer, and layouts are kept
    def by_slot(self) -> dict[int, dict[str, tuple[str, tuple[int, ...]]]]:
        out: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for _b, _e, slot, arr, dtype, shape in self.entries:
            out.setdefault(slot, {})[arr] = (dtype, shape)
        return out

    @cached_property
    def page_phase(self) -> dict[tuple[int, str], int]:
        """(slot, array) -> where its data starts within a page of the file."""
        return {(slot, arr): (self.base + begin) % PAGE for begin, _e, slot, arr, _d, _s in self.entries}


def _data_start(entry) -> int:
    return entry[1]["data_offsets"][0]


def _parse_blob_layout(head: bytes, blob_id: str, agent: str | None) -> _Layout:
    try:
        base, header, _meta = parse_header(head, blob_id)
    except CorruptBlobError as e:
        raise _corrupt(blob_id, agent, f"its header does not parse ({e.__cause__})") from e
    entries, expected = [], 0
    for name, info in sorted(header.items(), key=_data_start):
        begin, end = info["data_offsets"]
        slot, _, arr = name.partition(".")
        if begin != expected or not slot.isdigit():
            raise _corrupt(blob_id, agent, "its tensor layout is not a chunk blob's")
        expected = end
        entries.append((begin, end, int(slot), arr, info["dtype"], tuple(info["shape"])))
    return _Layout(bytes(head[:base]), base, tuple(entries))


# Layouts of blobs whose bytes were verified in this process. A blob's name is the hash of its bytes,
# so a verified layout stays true of that name for good: restores of shared or repeated prefixes skip
# opening, reading and parsing those headers again (JSON is most of a small restore's own work).
# Only what verified goes in: a damaged header read once must not be reused after a repair.
_VERIFIED: OrderedDict[str, _Layout] = OrderedDict()
_VERIFIED_MAX = 4096
_verified_lock = threading.Lock()


def _known_layout(blob_id: str) -> _Layout | None:
    with _verified_lock:
        layout = _VERIFIED.get(blob_id)
        if layout is not None:
            _VERIFIED.move_to_end(blob_id)
        return layout


def _remember_layout(blob_id: str, layout: _Layout) -> None:
    with _verified_lock:
        _VERIFIED[blob_id] = layout
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)


@dataclass
class _Planned:
    """One blob's layout, and the slots it fills with which positions."""

    blob_id: str
    layout: _Layout
    uses: dict[int, int] = field(default_factory=dict)  # slot -> first position held in the file


def _run_offsets(view: np.ndarray, length: int) -> tuple[int, list[tuple[int, int]]]:
    """Where `length` positions from position 0 of a C-contiguous (..., positions, dim) array lie in its
    bytes: (bytes per position, [(offset, bytes)] per leading index, or the whole array when they are
    all of it). Positions from `at` on lie `at` times the bytes per position further on."""
    positions, row = view.shape[-2], view.shape[-1] * view.itemsize
    if length == positions:
        return row, [(0, view.nbytes)]
    step = positions * row
    return row, [(o * step, length * row) for o in range(view.nbytes // step if step else 0)]


HASH_BATCH = 512 << 10  # bytes read per preadv, then hashed at once while they are in the CPU's cache


def _batches(buffers: list, limit: int):
    """Consecutive runs of `buffers` of about `limit` bytes (a longer buffer is split into slices),
    each with its size."""
    batch, size = [], 0
    for b in buffers:
        while len(b) > limit - size:
            take = limit - size
            batch.append(b[:take])
            yield batch, limit
            batch, size, b = [], 0, b[take:]
        if len(b):
            batch.append(b)
            size += len(b)
    if batch:
        yield batch, size


PARALLEL_BYTES = 16 << 20  # below this one thread is faster: the GIL-bound bookkeeping of several
# threads contends, and there are few page faults to overlap (a 24 MiB qwen restore read side by side:
# cold 0.94-0.95x mlx-lm's against 1.10-1.13x serial, warm alike)
_SERIAL = IoPool(1)
# Blobs read side by side: one per core. Copies out of the page cache are CPU work, and more readers
# than cores only contend on an idle machine (qwen 4096 warm: 9.2 ms on 2 threads, 11-12 ms on 4; llama
# 4096 with MLX's cache limit raised: 98 ms on 4 against mlx-lm's 60). (On a loaded machine 4 readers
# won only by taking a larger share of the CPU from other processes.)
READ_WIDTH = CORES
# Blobs read side by side when they are not in the page cache: the device then works on several at once
# (qwen 4096, cache dropped, against mlx-lm's one file: 1.11-1.13x on 2 readers, 1.00-1.03x on 4,
# 0.90-1.01x on 8). Their own threads: most of their time is spent waiting, not copying.
COLD_READ_WIDTH = 8
_COLD = IoPool(COLD_READ_WIDTH)


@dataclass(frozen=True)
class _Template:
    """How every blob with one tensor list fills this restore's arrays, up to a shift in position:
    (array bytes, offset at position 0, bytes, bytes per position) per run, in file order; read
    batches as (run index range counting the header as 0, bytes); and what lands where."""

    runs: list
    batches: list
    landed: dict
    last_at: int  # the furthest position a blob of this layout may start at


@dataclass
class _Dest:
    """Where one array's positions land: writable views of it, and what a blob's tensor must match."""

    view: np.ndarray
    flat: memoryview  # its bytes, sliced into read buffers
    dtype: str  # safetensors name
    lead: tuple[int, ...]  # the shape before (positions, row)
    row: int
    position_bytes: int  # bytes of one position across the leading dimensions

    def fits(self, dtype: str, shape: tuple[int, ...], nbytes: int) -> bool:
        """A blob tensor of this dtype, shape and size can land in this array (where is checked apart).
        String and tuple compares, not numpy's."""
        return (
            dtype == self.dtype
            and len(shape) == len(self.lead) + 2
            and shape[-1] == self.row
            and shape[:-2] == self.lead
            and nbytes == shape[-2] * self.position_bytes
        )


class ScatterReader:
    """Builds the positional slots' arrays: slot -> (origin, total positions) from the blobs given."""

    def __init__(
        self,
        blob_path,
        spans: dict[int, tuple[int, int]],
        agent: str | None,
        io: IoPool | None = None,
        windowed: frozenset[int] = frozenset(),
    ):
        self.blob_path = blob_path
        self.spans = spans
        self.windowed = windowed  # slots of sliding-window layers: their arrays outlive the others'
        self.agent = agent
        self.io = io or _SERIAL
        self.arrays: dict[int, dict[str, mx.array]] = {}
        self.dests: dict[tuple[int, str], _Dest] = {}
        self.plans: dict[str, _Planned] = {}
        self.first_plan: dict[int, _Planned] = {}
        self._templates: dict = {}

    def _open(self, blob_id: str) -> int:
        return open_blob(self.blob_path(blob_id), blob_id, self.agent)

    def add(self, blob_id: str, slot: int, file_from: int) -> None:
        """Note that `slot`'s positions from file_from are in this blob (reads its header once)."""
        plan = self.plans.get(blob_id)
        if plan is None:
            layout = _known_layout(blob_id) or self._read_layout(blob_id)
            plan = self.plans[blob_id] = _Planned(blob_id, layout)
        plan.uses[slot] = file_from
        if slot not in self.first_plan:
            self.first_plan[slot] = plan

    def _read_layout(self, blob_id: str) -> _Layout:
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
        return _parse_blob_layout(head, blob_id, self.agent)

    def _allocate(self) -> None:
        """Every slot's arrays, shaped from the first blob naming it (not written first: the reads fill every
        position, and run() checks that they did)."""
        names, specs, phases, lifetimes = [], [], [], []
        for slot, plan in self.first_plan.items():
            origin, total = self.spans[slot]
            by_slot = plan.layout.by_slot
            if slot not in by_slot:
                raise _corrupt(plan.blob_id, self.agent, f"it holds no tensors of layer {slot}")
            for name, (dtype, shape) in by_slot[slot].items():
                if len(shape) < 2:
                    raise _corrupt(plan.blob_id, self.agent, f"its layer {slot} does not fit the cache")
                names.append((slot, name))
                specs.append((shape[:-2] + (total, shape[-1]), mlx_dtype(dtype)))
                # Placed as its data lies in the file: the kernel copies page-congruent bytes fastest.
                phase = plan.layout.page_phase[(slot, name)]
                phases.append(phase if phase % specs[-1][1].size == 0 else None)
                lifetimes.append(slot in self.windowed)
        self.placed = dict(zip(names, uninit.place(specs, phases, lifetimes)))
        for (slot, name), (_shape, dtype) in zip(names, specs):
            view, flat = self.placed[(slot, name)].host, self.placed[(slot, name)].flat
            self.dests[(slot, name)] = _Dest(
                view,
                flat,
                st_name(dtype),
                tuple(view.shape[:-2]),
                view.shape[-1],
                math.prod(view.shape[:-2]) * view.shape[-1] * view.itemsize,
            )

    def run(self) -> dict[int, dict[str, mx.array]]:
        """Read every planned blob and return slot -> arrays (blobs side by side on the store's I/O
        threads: preadv lets go of the GIL, so copies out of the page cache and cold reads overlap)."""
        self._allocate()
        landed: dict[tuple[int, str], int] = {}
        plans = list(self.plans.values())
        io, width = self.io, READ_WIDTH
        if sum(p.layout.size for p in plans) < PARALLEL_BYTES:
            io = _SERIAL
        elif self._cold(plans[0]) or self._cold(plans[-1]):
            io, width = _COLD, COLD_READ_WIDTH
        for got in io.map(self._fill, plans, width=width):
            for key, n in got.items():
                landed[key] = landed.get(key, 0) + n
        # Every position must have come from a blob: the plan guarantees it, and this keeps a wrong
        # plan from ever handing out a cache with zeros where KV should be.
        for slot, name in self.placed:
            if landed.get((slot, name), 0) != self.spans[slot][1]:
                raise StoreError(
                    f"restore of layer {slot} filled {landed.get((slot, name), 0)} of "
                    f"{self.spans[slot][1]} positions; nothing was returned"
                )
        for (slot, name), placed in self.placed.items():
            self.arrays.setdefault(slot, {})[name] = placed.array()
        return self.arrays

    def _cold(self, plan: _Planned) -> bool:
        """Whether the blob's last byte must come from the device: a read that may not wait says so (Linux's
        RWF_NOWAIT; False where there is none, or when the probe fails for another reason)."""
        nowait = getattr(os, "RWF_NOWAIT", None)
        if nowait is None or not hasattr(os, "preadv"):
            return False
        try:
            fd = self._open(plan.blob_id)
        except (OSError, StoreError):
            return False  # the read itself reports it
        try:
            os.preadv(fd, [bytearray(1)], max(plan.layout.size - 1, 0), nowait)
            return False
        except BlockingIOError:
            return True
        except OSError:  # a file system without it (EOPNOTSUPP)
            return False
        finally:
            os.close(fd)

    def _fill(self, plan: _Planned) -> dict[tuple[int, str], int]:
        """Read one blob into its layers' arrays; returns (slot, array) -> positions written."""
        layout = plan.layout
        head = bytearray(layout.base)  # read again with the data: the hash covers the bytes as they are now
        fast = self._shifted_runs(plan, head)
        if fast is not None:
            batches, landed = fast
            scratch = []
        else:
            buffers, scratch, landed = self._runs(plan, head)
            batches = _batches(buffers, HASH_BATCH)
        h = xxhash.xxh3_128()
        fd = self._open(plan.blob_id)
        try:
            size = os.fstat(fd).st_size
            if size != layout.size:
                raise _corrupt(plan.blob_id, self.agent, f"it is {size} bytes, its header says {layout.size}")
            got = 0
            for batch, nbytes in batches:
                n = read_into(fd, got, batch)
                got += n
                if n != nbytes:
                    break
                for b in batch:  # hashed while still in the CPU cache: no second trip through memory
                    h.update(b)
        finally:
            os.close(fd)
        if got != layout.size:
            raise _corrupt(plan.blob_id, self.agent, "it is shorter than its header says")
        if h.hexdigest() != plan.blob_id:
            raise _corrupt(plan.blob_id, self.agent, "its bytes no longer match its hash")
        if head != layout.head:  # verified bytes, but not the header this plan was made from (rewritten since)
            raise _corrupt(plan.blob_id, self.agent, "its header changed while it was being read")
        _remember_layout(plan.blob_id, layout)
        for view, dest, kept in scratch:
            view[..., dest : dest + kept.shape[-2], :] = kept
        return landed

    def _shifted_runs(self, plan: _Planned, head: bytearray):
        """The common case done once per restore instead of once per blob: every tensor of the blob
        lands whole, all at one position. Blobs of full chunks share their layout's tensor list, so
        the checks, destinations and batches are worked out for the first such blob and only shifted
        by the position for the others. Returns (read batches, landed), or None for the general path."""
        shift = None
        for slot, file_from in plan.uses.items():
            at = file_from - self.spans[slot][0]
            if at < 0 or (shift is not None and at != shift):
                return None
            shift = at
        key = (plan.layout.entries, tuple(plan.uses))
        template = self._templates.get(key, False)
        if template is False:
            template = self._templates[key] = self._template(plan)
        if template is None or shift > template.last_at:
            return None  # the general path checks and reports it
        views = [head]
        for flat, offset, nbytes, row in template.runs:
            lo = offset + shift * row
            views.append(flat[lo : lo + nbytes])
        return [(views[i:j], nbytes) for (i, j), nbytes in template.batches], template.landed

    def _template(self, plan: _Planned) -> _Template | None:
        runs, landed, last_at = [], {}, None
        for begin, end, slot, arr, dtype, shape in plan.layout.entries:
            dest = self.dests.get((slot, arr)) if slot in plan.uses else None
            if dest is None or len(shape) < 2 or not dest.fits(dtype, shape, end - begin):
                return None
            length, total = shape[-2], self.spans[slot][1]
            if length > total:
                return None
            landed[(slot, arr)] = length
            last_at = total - length if last_at is None else min(last_at, total - length)
            row, offsets = _run_offsets(dest.view, length)
            runs.extend((dest.flat, offset, nbytes, row) for offset, nbytes in offsets)
        sizes = [plan.layout.base] + [nbytes for _f, _o, nbytes, _r in runs]
        batches, i0, total_bytes = [], 0, 0
        for i, n in enumerate(sizes):  # whole runs up to about HASH_BATCH bytes a read
            total_bytes += n
            if total_bytes >= HASH_BATCH or i == len(sizes) - 1:
                batches.append(((i0, i + 1), total_bytes))
                i0, total_bytes = i + 1, 0
        return _Template(runs, batches, landed, last_at if last_at is not None else 0)

    def _runs(self, plan: _Planned, head: bytearray):
        """Buffers to read the blob into, in file order; (array view, position, tail) for tensors the
        window starts inside; and (slot, array) -> positions written."""
        layout = plan.layout
        buffers: list[bytearray | memoryview] = [head]
        scratch, landed = [], {}
        for begin, end, slot, arr, dtype, shape in layout.entries:
            dest = self.dests.get((slot, arr)) if slot in plan.uses else None
            if dest is None:  # a layer of this blob the restore does not need: land it aside for the hash
                buffers.extend(blocks(np.empty(end - begin, dtype=np.uint8)))
                continue
            origin, total = self.spans[slot]
            file_from = plan.uses[slot]
            length = shape[-2] if len(shape) >= 2 else 0
            cut = max(0, origin - file_from)
            at = file_from + cut - origin
            if (
                not (len(shape) >= 2 and dest.fits(dtype, shape, end - begin))
                or length < cut
                or at + length - cut > total
            ):
                raise _corrupt(plan.blob_id, self.agent, f"its layer {slot} does not fit the cache")
            landed[(slot, arr)] = length - cut
            if cut == 0:
                row, offsets = _run_offsets(dest.view, length)
                buffers.extend(dest.flat[o + at * row : o + at * row + n] for o, n in offsets)
            else:  # the window starts inside this chunk: land it aside, keep the tail
                tmp = np.empty(shape, dtype=dest.view.dtype)
                scratch.append((dest.view, at, tmp[..., cut:, :]))
                buffers.extend(blocks(tmp))
        return buffers, scratch, landed
