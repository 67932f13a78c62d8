"""The save path: write missing blobs durably, then commit the snapshot in one transaction."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from sqlalchemy import insert, select, update

from kvstore.cache import codec
from kvstore.index import db
from kvstore.index import schema
from kvstore.index import sizes
from kvstore.blob import tensorfile
from kvstore.blob.local import hash_buffers
from kvstore.errors import ModelMismatchError, StoreError
from kvstore.blob.iopool import CORES
from kvstore.cache.fingerprint import model_name
from kvstore.cache.keys import chunk_keys, chunk_spans, tokens_to_array
from kvstore.names import validate_name
from kvstore.records import Snapshot

if TYPE_CHECKING:
    from kvstore.store import Store

MAX_ATTEMPTS = 5
LOCKED_AFTER = 2  # attempts before a save plans and writes under the write lock (see save)
IN_CHUNK = 400  # keys per IN (...) list: SQLite's default variable limit is generous, PostgreSQL's too


class _Retry(Exception):
    """A concurrent gc removed something this save relied on: plan again."""


@dataclass
class Piece:
    """KV of one (chunk, slot): positions [chunk start + first, chunk end)."""

    chunk: int
    slot: int
    first: int
    arrays: dict
    meta: dict | None = None


def _ids(seq, n=IN_CHUNK):
    seq = list(seq)
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def existing_layers(conn, keys: list[bytes]) -> dict[tuple[bytes, int], int]:
    """{(chunk key, slot): first} for the keys the index already has."""
    out = {}
    cl = schema.chunk_layers
    for part in _ids(keys):
        for k, layer, first in conn.execute(
            select(cl.c.chunk_key, cl.c.layer, cl.c.first).where(cl.c.chunk_key.in_(part))
        ):
            out[(bytes(k), layer)] = first
    return out


def _host_views(slot: codec.Slot, leaf: Any) -> tuple[dict[str, mx.array], dict[str, str], int]:
    """A positional leaf's arrays (bf16 viewed as uint16, which numpy can hold), their safetensors
    dtypes, and the position of their index 0; evaluated by the caller, all layers at once."""
    if slot.cls == "QuantizedKVCache":
        named = {f"{p}{i}": part for p, parts in (("k", leaf.keys), ("v", leaf.values)) for i, part in enumerate(parts)}
        lo = 0
    elif slot.kind == "rot":
        keys, values = codec._rotating_arrays(leaf)
        named, lo = {"k": keys, "v": values}, codec.held_range(slot, leaf)[0]
    else:
        named, lo = {"k": leaf.keys, "v": leaf.values}, 0
    dtypes = {n: tensorfile.st_dtype(a) for n, a in named.items()}
    return {n: a.view(mx.uint16) if a.dtype == mx.bfloat16 else a for n, a in named.items()}, dtypes, lo


def _host_arrays(slots, leaves, wanted: list[int]) -> dict[int, tuple[dict[str, tensorfile.HostArray], int]]:
    """Zero-copy host views of the wanted slots' arrays after one evaluation for all of them (an
    evaluation per layer costs ~0.07 ms, a millisecond or two of a small save)."""
    views = {s: _host_views(slots[s], leaves[s]) for s in wanted}
    mx.eval([a for named, _d, _lo in views.values() for a in named.values()])
    return {s: ({n: tensorfile.HostArray(np.asarray(a), dtypes[n]) for n, a in named.items()}, lo)
            for s, (named, dtypes, lo) in views.items()}


def _slice(arrays: dict[str, tensorfile.HostArray], a: int, b: int) -> dict[str, tensorfile.HostArray]:
    return {n: tensorfile.HostArray(h.data[..., a:b, :], h.dtype) for n, h in arrays.items()}


def plan_pieces(slots, leaves, n_tokens: int, chunk_size: int, keys: list[bytes],
                have: dict[tuple[bytes, int], int], captured: dict | None) -> list[Piece]:
    """Pieces of the live cache (and captured during prefill) that the index lacks or holds less of."""
    spans = chunk_spans(n_tokens, chunk_size)
    want: dict[tuple[int, int], Piece] = {}
    missing: dict[int, list[tuple[int, int]]] = {}  # slot -> [(chunk, first)] the index lacks
    for s, (slot, leaf) in enumerate(zip(slots, leaves)):
        if slot.kind == "state":
            if spans and (keys[-1], s) not in have:
                arrays, meta = codec.extract_state(slot, leaf)
                want[(len(spans) - 1, s)] = Piece(len(spans) - 1, s, 0, arrays, meta)
            continue
        lo, hi = codec.held_range(slot, leaf)
        for i, (start, length) in enumerate(spans):
            end = start + length
            if end <= lo or start >= hi:
                continue
            first = max(start, lo) - start
            if have.get((keys[i], s), length + 1) > first:
                missing.setdefault(s, []).append((i, first))
    hosts = _host_arrays(slots, leaves, list(missing)) if missing else {}
    for s, pieces in missing.items():
        host, base = hosts[s]
        for i, first in pieces:
            start, length = spans[i]
            want[(i, s)] = Piece(i, s, first, _slice(host, start + first - base, start + length - base))
    for (i, s), piece in (captured or {}).items():
        if i >= len(spans):
            continue
        best = want.get((i, s))
        if have.get((keys[i], s), spans[i][1] + 1) > piece.first and (best is None or best.first > piece.first):
            want[(i, s)] = piece
    return sorted(want.values(), key=lambda p: (p.slot, p.chunk))


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
    meta = {"kind": "chunk", "first": str(first.first), "slots": ",".join(str(p.slot) for p in group),
            "model": model}
    return tensorfile.encode(arrays, meta)


@dataclass
class _Blob:
    """One group of pieces, encoded: the file's buffers and the id (hash) they are stored under."""

    group: list[Piece]
    buffers: list
    blob_id: str
    nbytes: int


def encode_pieces(store: "Store", pieces: list[Piece], slots, model: str) -> list[_Blob]:
    """Every group of pieces encoded and hashed, a blob each (CPU work: one thread per core)."""
    if not pieces:
        return []
    mx.eval([a for p in pieces for a in p.arrays.values() if isinstance(a, mx.array)])

    def encode(group):
        buffers = _encode(group, slots, model)
        return _Blob(group, buffers, hash_buffers(buffers), sum(len(b) for b in buffers))

    return store.io.map(encode, _group(pieces, slots), width=CORES)


def start_writes(store: "Store", blobs: list[_Blob]) -> Future:
    """Put the blobs on the store's I/O threads; the future holds, per blob, whether it was written
    (False for a dedup hit). The caller meanwhile fills in its transaction (see _commit).

    Returns once every blob's bytes are copied to the kernel (or its put ended otherwise): the
    fsyncs that follow need no GIL, the copies' Python does, and a caller running SQL from the start
    held them off by a millisecond or two.
    """
    left, lock, copied = [len(blobs)], threading.Lock(), threading.Event()

    def one_copied() -> None:
        with lock:
            left[0] -= 1
            if left[0] <= 0:
                copied.set()

    def put(b: _Blob) -> bool:
        written = store.blobs.put(b.buffers, b.blob_id, copied=one_copied)[2]
        if not written:  # a dedup hit copies nothing
            one_copied()
        return written

    pending = store.io.start(put, blobs)
    # Also when the writes end early: a put that fails, and those the pool then no longer starts,
    # never report their bytes copied.
    pending.add_done_callback(lambda _f: copied.set())
    copied.wait()
    return pending


def finish_writes(store: "Store", blobs: list[_Blob], pending: Future) -> list[tuple[Piece, str, int, bool]]:
    """Wait until every blob is durable; (piece, blob id, blob bytes, newly written) per piece."""
    flags = pending.result()
    store.blobs.sync_dirs({b.blob_id for b, w in zip(blobs, flags) if not w})  # put() synced what it wrote
    return [(p, b.blob_id, b.nbytes, w) for b, w in zip(blobs, flags) for p in b.group]


def save(store: "Store", name: str, cache: list, tokens: Any, model: str, meta: dict | None,
         label: str | None, pinned: bool, captured: dict | None) -> Snapshot:
    validate_name(name)
    if label is not None:
        validate_name(label, "snapshot label")
    if not isinstance(cache, (list, tuple)):
        raise TypeError(f"cache must be a list of mlx-lm cache objects, not {type(cache).__name__}")
    toks = tokens_to_array(tokens)
    n = int(toks.size)
    tree, slots, leaves = codec.describe(list(cache))
    codec.check_offsets(leaves, slots, n)
    layout = json.dumps(codec.layout_json(tree, slots), sort_keys=True)
    keys = chunk_keys(model, toks, store.chunk_size)
    spans = chunk_spans(n, store.chunk_size)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
    meta_json = json.dumps(meta if meta is not None else {}, sort_keys=True, default=str)
    for attempt in range(MAX_ATTEMPTS):
        if attempt >= LOCKED_AFTER:
            # A gc keeps sweeping what this save relies on (grace=0 in a loop): plan, write and commit
            # under the write lock, where no gc removes a file, so this attempt cannot be undone.
            with db.transaction(store.engine, write=True, what=f"saving agent {name!r}") as conn:
                _check_model_and_agent(conn, name, model, layout)
                have = existing_layers(conn, keys)
                pieces = plan_pieces(slots, leaves, n, store.chunk_size, keys, have, captured)
                blobs = encode_pieces(store, pieces, slots, model)
                return _commit(store, name, model, layout, toks, keys, spans, slots, have, blobs,
                               start_writes(store, blobs), meta_json if meta is not None else None, label,
                               pinned, conn)
        with db.transaction(store.engine, write=False, what="planning a save") as conn:
            _check_model_and_agent(conn, name, model, layout)
            have = existing_layers(conn, keys)
        pieces = plan_pieces(slots, leaves, n, store.chunk_size, keys, have, captured)
        blobs = encode_pieces(store, pieces, slots, model)
        try:
            return _commit(store, name, model, layout, toks, keys, spans, slots, have, blobs,
                           start_writes(store, blobs), meta_json if meta is not None else None, label, pinned)
        except _Retry:
            continue
    raise StoreError(f"could not save agent {name!r}: a concurrent gc kept removing its chunks; try again")


def _check_model_and_agent(conn, name: str, model: str, layout: str) -> None:
    m = conn.execute(select(schema.models.c.layout).where(schema.models.c.fingerprint == model)).first()
    if m is not None and m.layout != layout:
        raise ModelMismatchError(
            f"this cache's layers do not match the ones stored for model {model}: "
            "the cache comes from another model (or other KV quantization) than the fingerprint says")
    a = conn.execute(
        select(schema.models.c.fingerprint).select_from(schema.agents.join(schema.models))
        .where(schema.agents.c.name == name)).first()
    if a is not None and a.fingerprint != model:
        raise ModelMismatchError(
            f"agent {name!r} belongs to model {a.fingerprint}, not {model}; fork or delete it to change models")


def _model_id(conn, model: str, layout: str, now: float) -> int:
    models = schema.models
    row = conn.execute(select(models.c.id, models.c.name).where(models.c.fingerprint == model)).first()
    name = model_name(model)
    if row:
        if row.name is None and name is not None:  # a model first saved by its bare fingerprint gets its name
            conn.execute(update(models).where(models.c.id == row.id).values(name=name))
        return row.id
    return conn.execute(insert(models).values(fingerprint=model, layout=layout, created=now, name=name)
                        .returning(models.c.id)).scalar_one()


def _commit(store, name, model, layout, toks, keys, spans, slots, have, blobs: list[_Blob], pending: Future,
            meta_json, label, pinned, locked=None):
    """Commit the snapshot once its blobs are durable.

    The blob writes (`pending`) run while this fills in the transaction: the statements cost a few
    milliseconds of CPU, about what the fsyncs of a small save wait. The commit itself comes after
    every blob and folder is synced (the write protocol's order), and the write lock is held from
    the start, so no gc can remove a blob between its rename and the commit.
    """
    now = db.now()
    try:
        with contextlib.nullcontext(locked) if locked is not None else \
                db.transaction(store.engine, write=True, what=f"saving agent {name!r}") as conn:
            # Under the write lock: the chunks this snapshot reuses must still exist (a gc may have run).
            reused = list(have)
            if reused:
                still = existing_layers(conn, sorted({k for k, _ in reused}))
                if any(key not in still for key in reused):
                    raise _Retry()
            model_id = _model_id(conn, model, layout, now)
            db.insert_ignore(conn, schema.blobs, [{"id": b.blob_id, "nbytes": b.nbytes, "created": now}
                                                  for b in {b.blob_id: b for b in blobs}.values()])
            rows = [{"chunk_key": keys[p.chunk], "layer": p.slot, "blob_id": b.blob_id, "first": p.first}
                    for b in blobs for p in b.group]
            sizes.add_chains(conn, model_id, model, [keys], {k: length for k, (_s, length) in zip(keys, spans)},
                             rows, {b.blob_id: b.nbytes for b in blobs})
            agent_id = _agent_row(conn, name, model_id, meta_json, now)
            snap_id = conn.execute(insert(schema.snapshots).values(
                agent_id=agent_id, model_id=model_id, n_tokens=int(toks.size), tokens=toks.tobytes(),
                created=now, label=label, pinned=bool(pinned)).returning(schema.snapshots.c.id)).scalar_one()
            if keys:
                conn.execute(insert(schema.snapshot_chunks),
                             [{"snapshot_id": snap_id, "seq": i, "chunk_key": k} for i, k in enumerate(keys)])
            conn.execute(update(schema.agents).where(schema.agents.c.id == agent_id).values(head=snap_id,
                                                                                            updated=now))
            written = finish_writes(store, blobs, pending)
            for blob_id in {w[1] for w in written}:
                if not store.blobs.path(blob_id).exists():
                    raise _Retry()
    finally:
        pending.exception()  # a failed commit never leaves blob writes running behind it
    files = {b: (nb, w) for _p, b, nb, w in written}
    return Snapshot(id=snap_id, agent=name, model=model, n_tokens=int(toks.size), created=now, label=label,
                    pinned=bool(pinned), bytes_written=sum(nb for nb, w in files.values() if w),
                    blobs_written=sum(1 for _nb, w in files.values() if w),
                    blobs_reused=sum(1 for _nb, w in files.values() if not w))


def _agent_row(conn, name: str, model_id: int, meta_json: str | None, now: float) -> int:
    agents = schema.agents
    row = conn.execute(select(agents.c.id).where(agents.c.name == name)).first()
    if row is not None:
        if meta_json is not None:
            conn.execute(update(agents).where(agents.c.id == row.id).values(meta=meta_json))
        return row.id
    return conn.execute(insert(agents).values(name=name, model_id=model_id, meta=meta_json or "{}",
                                              created=now, updated=now).returning(agents.c.id)).scalar_one()
