"""The save path: write missing blobs durably, then commit the snapshot in one transaction."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from kvstore.blob import tensorfile
from kvstore.blob.iopool import gather
from kvstore.cache import codec
from kvstore.cache.fingerprint import model_name
from kvstore.cache.keys import chunk_keys, chunk_spans, tokens_to_array
from kvstore.errors import ModelMismatchError, WindowNotCapturedWarning
from kvstore.index import db, queries
from kvstore.index.commit import AgentEntry, Chain, LayerRow, ModelEntry, NewSnapshot, Retry, commit_chain, retrying
from kvstore.index.layers import StoredLayers, stored_layers
from kvstore.names import validate_name
from kvstore.ops.archive_export import KEPT_APART
from kvstore.records import Snapshot

if TYPE_CHECKING:
    from kvstore.store import Store

MAX_ATTEMPTS = 5
LOCKED_AFTER = 2  # attempts before a save plans and writes under the write lock (see save)


def utc_day(t: float) -> str:
    """The UTC day (YYYY-MM-DD) of epoch seconds `t`: the key of the write accounting."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


@dataclass
class Piece:
    """KV of one (chunk, slot): positions [chunk start + first, chunk end)."""

    chunk: int
    slot: int
    first: int
    arrays: dict
    meta: dict | None = None


def _host_views(slot: codec.Slot, leaf: Any) -> tuple[dict[str, mx.array], int]:
    """A positional leaf's arrays by name, and the position of their index 0."""
    if slot.cls == "QuantizedKVCache":
        named = {f"{p}{i}": part for p, parts in (("k", leaf.keys), ("v", leaf.values)) for i, part in enumerate(parts)}
        return named, 0
    if slot.kind == "rot":
        keys, values = codec.rotating_arrays(leaf)
        return {"k": keys, "v": values}, codec.held_range(slot, leaf)[0]
    return {"k": leaf.keys, "v": leaf.values}, 0


def _host_arrays(slots, leaves, wanted: list[int]) -> dict[int, tuple[dict[str, tensorfile.HostArray], int]]:
    """Zero-copy host views of the wanted slots' arrays after one evaluation for all of them (an
    evaluation per layer costs ~0.07 ms, a millisecond or two of a small save)."""
    views = {s: _host_views(slots[s], leaves[s]) for s in wanted}
    mx.eval([a for named, _lo in views.values() for a in named.values()])
    return {s: ({n: tensorfile.host(a) for n, a in named.items()}, lo) for s, (named, lo) in views.items()}


def _slice(arrays: dict[str, tensorfile.HostArray], a: int, b: int) -> dict[str, tensorfile.HostArray]:
    return {n: tensorfile.HostArray(h.data[..., a:b, :], h.dtype) for n, h in arrays.items()}


def plan_pieces(
    slots,
    leaves,
    *,
    n_tokens: int,
    chunk_size: int,
    keys: list[bytes],
    have: Mapping[tuple[bytes, int], int],
    captured: dict | None,
) -> list[Piece]:
    """Pieces of the live cache (and captured during prefill) that the index lacks or holds less of."""
    spans = chunk_spans(n_tokens, chunk_size)
    # Chunks the index holds whole need nothing: a turn plans over its new chunks only (kvstore.index.layers).
    todo = have.unfilled(keys[: len(spans)]) if isinstance(have, StoredLayers) else range(len(spans))
    want: dict[tuple[int, int], Piece] = {}
    missing: dict[int, list[tuple[int, int]]] = {}  # slot -> [(chunk, first)] the index lacks
    for s, (slot, leaf) in enumerate(zip(slots, leaves)):
        if slot.kind == "state":
            if spans and (keys[-1], s) not in have:
                arrays, meta = codec.extract_state(slot, leaf, n_tokens)
                want[(len(spans) - 1, s)] = Piece(len(spans) - 1, s, 0, arrays, meta)
            continue
        lo, hi = codec.held_range(slot, leaf)
        for i in todo:
            start, length = spans[i]
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
    meta = {"kind": "chunk", "first": str(first.first), "slots": ",".join(str(p.slot) for p in group), "model": model}
    return tensorfile.encode(arrays, meta)


@dataclass
class _Blob:
    """One group of pieces, encoded: the file's buffers and the id (hash) they are stored under."""

    group: list[Piece]
    buffers: list
    blob_id: str
    nbytes: int


def _encoded(group: list[Piece], slots, model: str) -> _Blob:
    """A group's blob, its id still to come: the blob store hashes it as it copies it (see put)."""
    buffers = _encode(group, slots, model)  # blobs name the model that computed them
    return _Blob(group, buffers, "", sum(len(b) for b in buffers))


STAGED_MAX = 64  # blobs copied before their durable halves start: temp files held open at once


def start_writes(store: Store, pieces: list[Piece], slots, model: str) -> tuple[list[_Blob], Future]:
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
    blobs: list[_Blob] = []
    puts: list[Future] = []
    staged: list = []
    try:
        for group in groups:
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


def finish_writes(store: Store, blobs: list[_Blob], pending: Future) -> list[tuple[Piece, str, int, bool]]:
    """Wait until every blob is durable; (piece, blob id, blob bytes, newly written) per piece."""
    flags = [written for batch in pending.result() for _id, _n, written in batch]
    store.blobs.sync_dirs({b.blob_id for b, w in zip(blobs, flags) if not w})  # put() synced what it wrote
    return [(p, b.blob_id, b.nbytes, w) for b, w in zip(blobs, flags) for p in b.group]


@dataclass(frozen=True)
class SavePlan:
    """What a save commits, fixed before its first attempt: the agent, model and snapshot."""

    name: str
    model: str  # the caller's model fingerprint
    fingerprint: str  # the one its chunk keys derive from: `model`, or an unverified import's namespace
    layout: str  # the cache layout, JSON text
    tokens: np.ndarray  # uint32 token ids
    keys: list[bytes]  # chunk keys of `tokens`
    spans: list[tuple[int, int]]
    meta_json: str | None  # None keeps the agent's stored metadata
    label: str | None
    pinned: bool
    moves_from: tuple[str, ...] = ()  # fingerprints the agent may belong to now: the save moves it to this one


def save(
    store: Store,
    name: str,
    cache: list,
    tokens: Any,
    *,
    model: str,
    meta: dict | None = None,
    label: str | None = None,
    pinned: bool = False,
    captured: dict | None = None,
    namespace: str | None = None,
    moves_from: tuple[str, ...] = (),
) -> Snapshot:
    """Save `cache` as agent `name`'s new head (Store.save).

    `namespace`: a fingerprint of its own for a new agent's chunk keys, so no other agent's save or
    restore meets them (an unverified import of an mlx-lm file: kvstore.mlxfile); recorded as standing
    for `model`, like an unverified archive import's (ops.archive).
    """
    validate_name(name)
    if label is not None:
        validate_name(label, "snapshot label")
    if not isinstance(cache, (list, tuple)):
        raise TypeError(f"cache must be a list of mlx-lm cache objects, not {type(cache).__name__}")
    toks = tokens_to_array(tokens)
    n = int(toks.size)
    tree, slots, leaves = codec.describe(list(cache))
    codec.check_offsets(leaves, slots, n)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
    layout = json.dumps(codec.layout_json(tree, slots), sort_keys=True)
    meta_json = None if meta is None else json.dumps(meta, sort_keys=True, default=str)
    plan: SavePlan | None = None

    def attempt(number: int) -> Snapshot:
        nonlocal plan
        # After LOCKED_AFTER attempts a gc keeps sweeping what this save relies on (grace=0 in a loop):
        # plan, write and commit under the write lock, where no gc removes a file.
        locked = number >= LOCKED_AFTER
        with db.transaction(
            store.engine, write=locked, what=f"saving agent {name!r}" if locked else "planning a save"
        ) as conn:
            if plan is None:
                # An agent imported without trust keeps its own namespace when it continues (ops.archive).
                fp = namespace or queries.agent_namespace(conn, name, model)
                plan = SavePlan(
                    name=name,
                    model=model,
                    fingerprint=fp,
                    layout=layout,
                    tokens=toks,
                    keys=chunk_keys(fp, toks, store.chunk_size),
                    spans=chunk_spans(n, store.chunk_size),
                    meta_json=meta_json,
                    label=label,
                    pinned=bool(pinned),
                    moves_from=tuple(moves_from),
                )
            stale = _check_model_and_agent(conn, plan)
            have = stored_layers(conn, plan.keys, slots=len(slots))
            if locked:  # this attempt cannot be undone by a gc
                blobs, pending = start(plan, have)
                return _commit(store, plan, have=have, blobs=blobs, pending=pending, locked=conn, stale_layout=stale)
        blobs, pending = start(plan, have)
        return _commit(store, plan, have=have, blobs=blobs, pending=pending, stale_layout=stale)

    def start(plan: SavePlan, have: Mapping[tuple[bytes, int], int]) -> tuple[list[_Blob], Future]:
        """Plan the pieces the index lacks and start writing their blobs."""
        pieces = plan_pieces(
            slots, leaves, n_tokens=n, chunk_size=store.chunk_size, keys=plan.keys, have=have, captured=captured
        )
        _warn_window_lost(store, plan, slots=slots, leaves=leaves, have=have, captured=captured)
        return start_writes(store, pieces, slots, model)

    return retrying(
        attempt,
        attempts=MAX_ATTEMPTS,
        gave_up=f"could not save agent {name!r}: a concurrent gc kept removing its chunks; try again",
    )


def _warn_window_lost(store: Store, plan: SavePlan, *, slots, leaves, have, captured) -> None:
    """Warn (once per store and model) when sliding-window chunks that already left the window are
    neither stored nor captured: the snapshot then restores only at exactly its length, never at an
    earlier chunk boundary (issue 15, item 3)."""
    model, keys, spans, n = plan.model, plan.keys, plan.spans, int(plan.tokens.size)
    warned = store.__dict__.setdefault("_window_warned", set())
    if model in warned:
        return
    for s, (slot, leaf) in enumerate(zip(slots, leaves)):
        if slot.kind != "rot" or leaf.keys is None:
            continue
        lo = codec.held_range(slot, leaf)[0]
        lost = [
            i
            for i, (start, length) in enumerate(spans)
            if start + length <= lo and (keys[i], s) not in have and (i, s) not in (captured or {})
        ]
        if lost:
            warned.add(model)
            warnings.warn(
                WindowNotCapturedWarning(
                    f"this sliding-window cache no longer holds {len(lost)} chunk(s) that left its window and were "
                    f"not captured: its snapshot restores only at exactly {n} tokens, never at an earlier chunk "
                    "boundary; capture chunks while prefilling (kvstore.cache.capture) to share prefixes"
                ),
                stacklevel=7,  # _warn_window_lost, start, attempt, retrying, save, Store.save: the caller
            )
            return


def _check_model_and_agent(conn, plan: SavePlan) -> bool:
    """Refuse a cache of another layout than its model's, or an agent of another model; True if the
    model's row has another layout but nothing belongs to it (the save then replaces that layout)."""
    layout = queries.model_layout(conn, plan.fingerprint)
    stale = layout is not None and layout != plan.layout
    if stale and queries.model_in_use(conn, plan.fingerprint):
        raise ModelMismatchError(
            f"this cache's layers do not match the ones stored for model {plan.fingerprint}: "
            "the cache comes from another model (or other KV quantization) than the fingerprint says"
        )
    owner = queries.agent_fingerprint(conn, plan.name)
    if owner is not None and owner != plan.fingerprint and owner not in plan.moves_from:
        raise ModelMismatchError(
            f"agent {plan.name!r} belongs to model {owner}, not {plan.fingerprint}; fork or delete it to change models"
        )
    return stale


def _commit(
    store: Store,
    plan: SavePlan,
    *,
    have: Mapping[tuple[bytes, int], int],
    blobs: list[_Blob],
    pending: Future,
    locked=None,
    stale_layout: bool,
) -> Snapshot:
    """Commit the snapshot once its blobs are durable.

    The blob writes (`pending`) run while this fills in the transaction: the statements cost a few
    milliseconds of CPU, about what the fsyncs of a small save wait. The commit itself comes after
    every blob and folder is synced (the write protocol's order), and the write lock is held from
    the start, so no gc can remove a blob between its rename and the commit. `locked` is the
    caller's write transaction, when it already holds one.
    """
    now = db.now()
    n = int(plan.tokens.size)
    try:
        with (
            contextlib.nullcontext(locked)
            if locked is not None
            else db.transaction(store.engine, write=True, what=f"saving agent {plan.name!r}") as conn
        ):
            if stale_layout:  # the planning found an unused model row of another layout: still unused?
                _check_model_and_agent(conn, plan)
                queries.relayout_model(conn, plan.fingerprint, plan.layout)
            (snap_id,) = commit_chain(conn, _chain(plan, blobs, now), chunk_size=store.chunk_size, now=now, reused=have)
            written = finish_writes(store, blobs, pending)
            if store.blobs.missing({w[1] for w in written}):  # a gc took one since: write it again
                raise Retry()
            new_bytes = sum(nb for nb, w in {b: (nb, w) for _p, b, nb, w in written}.values() if w)
            if new_bytes:  # the day's write accounting commits with the snapshot (reads.writes_by_day)
                queries.add_written(conn, utc_day(now), new_bytes)
    finally:
        pending.exception()  # a failed commit never leaves blob writes running behind it
    files = {b: (nb, w) for _p, b, nb, w in written}
    return Snapshot(
        id=snap_id,
        agent=plan.name,
        model=plan.model,
        n_tokens=n,
        created=now,
        label=plan.label,
        pinned=plan.pinned,
        bytes_written=sum(nb for nb, w in files.values() if w),
        blobs_written=sum(1 for _nb, w in files.values() if w),
        blobs_reused=sum(1 for _nb, w in files.values() if not w),
    )


def _chain(plan: SavePlan, blobs: list[_Blob], now: float) -> Chain:
    """What the save commits: its model, the blobs it wrote (or found) and their layer rows, the agent and
    its new head."""
    label = model_name(plan.model)
    if plan.fingerprint != plan.model:  # kept apart: the namespace stands for the real model
        label = f"{label or plan.model}{KEPT_APART}"
    return Chain(
        model=ModelEntry(
            fingerprint=plan.fingerprint,
            layout=plan.layout,
            name=label,
            stands_for=plan.model if plan.fingerprint != plan.model else None,
        ),
        agent=AgentEntry(
            name=plan.name,
            meta_json=plan.meta_json,
            created=now,
            updated=now,
            new=False,
            moves=bool(plan.moves_from),  # (checked against the agent's owner in _check_model_and_agent)
        ),
        snapshots=[NewSnapshot(tokens=plan.tokens, keys=plan.keys, created=now, label=plan.label, pinned=plan.pinned)],
        head=0,
        layers=[LayerRow(plan.keys[p.chunk], p.slot, b.blob_id, p.first) for b in blobs for p in b.group],
        blobs={b.blob_id: b.nbytes for b in blobs},
    )
