"""A save's blob writes: pieces grouped into blobs, each encoded, copied and hashed on the caller's
thread, then made durable (fsyncs, renames) on an I/O thread while the caller fills in its transaction."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from kvstore.blob import tensorfile
from kvstore.blob.iopool import gather
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


STAGED_MAX = 64  # blobs copied before their durable halves start: temp files held open at once


def start_writes(store: Reader, pieces: list[Piece], slots, model: str) -> tuple[list[PendingBlob], Future]:
    """Encode each blob and start storing it (store.blobs.start_put: a local store copies and hashes it
    here, naming it by that hash), then hand what waits on the device (fsyncs, renames) to one of the
    store's I/O threads (store.blobs.finish_all); returns the blobs, their ids set, and a future holding, per blob, whether it was
    written (False for a dedup hit). The caller meanwhile fills in its transaction (see _commit).

    Copies and hashes run on this thread, one blob after another, with no I/O thread running beside
    them: a thread woken per blob took the GIL from the copies (milliseconds each on a busy machine).
    Returns once every blob's bytes are copied to the kernel: the fsyncs that follow need no GIL.
    """
    groups = _group(pieces, slots)
    if not groups:
        return [], gather([])
    mx.eval([a for p in pieces for a in p.arrays.values() if isinstance(a, mx.array)])
    blobs: list[PendingBlob] = []
    puts: list[Future] = []
    staged: list = []
    try:
        for group in groups:
            if any(f.done() and f.exception() is not None for f in puts):
                break  # a blob already failed (a full disk): writing more would only fail again
            b = _encoded(group, slots, model)
            b.blob_id, finish = store.blobs.start_put(b.buffers)
            blobs.append(b)
            staged.append(finish)
            # With one I/O thread nothing runs beside this one: each blob is finished before the next.
            if len(staged) >= STAGED_MAX or store.io.threads <= 1:
                puts.append(store.io.submit(store.blobs.finish_all, staged, store.io))
                staged = []
    finally:  # also when a copy failed: what was copied is finished (or cleaned up) before it is raised
        if staged:
            puts.append(store.io.submit(store.blobs.finish_all, staged, store.io))
        pending = gather(puts)
        if len(blobs) < len(groups):
            pending.exception()
    return blobs, pending


def finish_writes(store: Reader, blobs: list[PendingBlob], pending: Future) -> list[tuple[Piece, str, int, bool]]:
    """Wait until every blob is durable; (piece, blob id, blob bytes, newly written) per piece."""
    flags = [written for batch in pending.result() for _id, _n, written in batch]
    store.blobs.sync_dirs({b.blob_id for b, w in zip(blobs, flags) if not w})  # put() synced what it wrote
    return [(p, b.blob_id, b.nbytes, w) for b, w in zip(blobs, flags) for p in b.group]
