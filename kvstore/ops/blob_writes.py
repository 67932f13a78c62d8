"""A save's blob writes: pieces grouped into blobs, each encoded, copied and hashed on the caller's
thread and one I/O thread per further core, then made durable (fsyncs, renames) on an I/O thread while
the caller fills in its transaction."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from kvstore.blob import tensorfile
from kvstore.blob.iopool import CORES, gather
from kvstore.ops.pieces import Piece

if TYPE_CHECKING:
    from kvstore.ops.parts import Reader

__all__ = ["PendingBlob", "start_writes", "finish_writes"]


def _group(pieces: list[Piece], slots) -> list[list[Piece]]:
    """Pieces that share one blob: every positional layer of a chunk holding the same positions.

    One file per chunk rather than per (chunk, layer): creating and fsyncing a file costs a few
    milliseconds on ext4 and far more with F_FULLFSYNC on macOS, and a 32-layer model would need
    32x the files (docs/ARCHITECTURE.md, "Why a blob holds all layers of a chunk").
    """
    groups: dict[tuple, list[Piece]] = {}
    for p in pieces:
        key = ("state", p.chunk, p.slot) if slots[p.slot].kind == "state" else ("pos", p.chunk, p.first)
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _encode(group: list[Piece], slots, model: str) -> list:
    first = group[0]
    if slots[first.slot].kind == "state":
        meta = {"kind": "state", "cls": slots[first.slot].cls, "slot": str(first.slot), "model": model}
        meta.update(first.meta or {})
        return tensorfile.encode(first.arrays, meta)
    arrays = {f"{p.slot}.{name}": a for p in group for name, a in p.arrays.items()}
    meta = {"kind": "chunk", "first": str(first.first), "slots": ",".join(str(p.slot) for p in group), "model": model}
    return tensorfile.encode(arrays, meta)


@dataclass
class PendingBlob:
    """One group of pieces, encoded: the file's buffers and the id (hash) they are stored under."""

    group: list[Piece]
    buffers: list
    blob_id: str
    nbytes: int


def _encoded(group: list[Piece], slots, model: str) -> PendingBlob:
    """A group's blob, its id still to come: the blob store hashes it as it copies it (see put)."""
    buffers = _encode(group, slots, model)  # blobs name the model that computed them
    return PendingBlob(group, buffers, "", sum(len(b) for b in buffers))


# Blobs copied side by side: one per core. writev and xxhash let go of the GIL, and two threads each
# copying half a save's blobs finish in about half the time here (a 48 MiB qwen save: 12 ms each
# against 24 ms on one), so the device gets the last blob's pages sooner.
COPY_WIDTH = CORES
COPY_PARALLEL_BYTES = 16 << 20  # below this the caller copies alone: waking a helper cost more than it
# saved (a 6 MiB qwen save: 9.0 ms on two threads against 8.4 ms on one)
STAGED_MAX = 64  # blobs copied before their durable halves start: temp files held open at once


def start_writes(store: Reader, pieces: list[Piece], slots, model: str) -> tuple[list[PendingBlob], Future]:
    """Encode each blob and start storing it (store.blobs.start_put: a local store copies and hashes it
    here, naming it by that hash), then hand what waits on the device (fsyncs, renames) to one of the
    store's I/O threads (store.blobs.finish_all); returns the blobs, their ids set, and a future holding, per
    blob, whether it was written (False for a dedup hit). The caller meanwhile fills in its transaction
    (see _commit).

    The copies run on this thread and, with more than one I/O thread, on COPY_WIDTH - 1 of them, each
    taking the next blob: one wake-up per save, not per blob (a thread woken per blob took the GIL from
    the copies, milliseconds each on a busy machine). Each blob is encoded by the thread that copies
    it, so the first copy, and the device's first writeback, start at once. After a copy fails (a full
    disk) no other starts: what was copied is finished or cleaned up, then the error is raised; after a
    blob failed to become durable, no further batch is copied.
    Returns once every blob's bytes are copied to the kernel: the fsyncs that follow need no GIL.
    """
    groups = _group(pieces, slots)
    if not groups:
        return [], gather([])
    mx.eval([a for p in pieces for a in p.arrays.values() if isinstance(a, mx.array)])
    blobs: list[PendingBlob] = []
    puts: list[Future] = []
    failed: list[BaseException] = []
    serial = store.io.threads <= 1  # nothing runs beside this thread: each blob is finished before the next
    nbytes = sum(a.nbytes for p in pieces for a in p.arrays.values())
    width = COPY_WIDTH if nbytes >= COPY_PARALLEL_BYTES else 1

    def copy(group: list[Piece]) -> tuple[PendingBlob, Callable] | None:
        if failed:
            return None
        try:
            b = _encoded(group, slots, model)
            b.blob_id, finish = store.blobs.start_put(b.buffers)
        except BaseException as e:  # noqa: BLE001 - raised below once the copied blobs are finished (an
            failed.append(e)  # interrupt too: map would drop the other threads' finished copies with it)
            return None
        return b, finish

    try:
        step = 1 if serial else STAGED_MAX
        for at in range(0, len(groups), step):
            copied = [c for c in store.io.map(copy, groups[at : at + step], width=width) if c is not None]
            blobs.extend(b for b, _f in copied)
            if copied:
                puts.append(store.io.submit(store.blobs.finish_all, [f for _b, f in copied], store.io))
            if failed:
                raise failed[0]
            if any(f.done() and f.exception() is not None for f in puts):
                break  # a blob already failed to become durable (a full disk): more would only fail again
    finally:  # also when a copy failed: what was copied is finished (or cleaned up) before it is raised
        pending = gather(puts)
        if len(blobs) < len(groups):
            pending.exception()
    return blobs, pending


def finish_writes(store: Reader, blobs: list[PendingBlob], pending: Future) -> list[tuple[Piece, str, int, bool]]:
    """Wait until every blob is durable; (piece, blob id, blob bytes, newly written) per piece."""
    flags = [written for batch in pending.result() for _id, _n, written in batch]
    store.blobs.sync_dirs({b.blob_id for b, w in zip(blobs, flags) if not w})  # put() synced what it wrote
    return [(p, b.blob_id, b.nbytes, w) for b, w in zip(blobs, flags) for p in b.group]
