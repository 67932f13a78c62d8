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

import numpy as np

from kvstore.cache import codec
from kvstore.cache.fingerprint import model_name
from kvstore.cache.keys import chunk_spans
from kvstore.errors import ModelMismatchError, WindowNotCapturedWarning
from kvstore.index import db, queries
from kvstore.index.commit import AgentEntry, Chain, LayerRow, ModelEntry, NewSnapshot, Retry, commit_chain, retrying
from kvstore.index.layers import stored_layers
from kvstore.names import validate_name
from kvstore.ops.archive_export import KEPT_APART
from kvstore.ops.blob_writes import PendingBlob, finish_writes, start_writes
from kvstore.ops.pieces import plan_pieces
from kvstore.records import Snapshot

if TYPE_CHECKING:
    from kvstore.ops.parts import Writer

MAX_ATTEMPTS = 5
LOCKED_AFTER = 2  # attempts before a save plans and writes under the write lock (see save)


def utc_day(t: float) -> str:
    """The UTC day (YYYY-MM-DD) of epoch seconds `t`: the key of the write accounting."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


@dataclass(frozen=True)
class SavePlan:
    """What a save commits, fixed before its first attempt: the agent, model and snapshot."""

    name: str
    model: str  # the caller's model fingerprint
    fingerprint: str  # the one its chunk keys derive from: `model`, or an unverified import's namespace
    layout: str  # the cache layout, JSON text
    tokens: np.ndarray  # uint32 token ids
    keys: list[bytes]  # chunk keys of `tokens`
    meta_json: str | None  # None keeps the agent's stored metadata
    label: str | None
    pinned: bool
    moves_from: tuple[str, ...] = ()  # fingerprints the agent may belong to now: the save moves it to this one


def save(
    store: Writer,
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
    toks = store.recent_tokens.convert(name, tokens)
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
                    keys=store.recent_tokens.chunk_keys(name, fp, toks, store.chunk_size),
                    meta_json=meta_json,
                    label=label,
                    pinned=bool(pinned),
                    moves_from=tuple(moves_from),
                )
            stale = _check_model_and_agent(conn, plan)
            have = stored_layers(conn, plan.keys, slots=len(slots), seen=store.whole_seen)
            if locked:  # this attempt cannot be undone by a gc
                blobs, pending = start(plan, have)
                return _commit(store, plan, have=have, blobs=blobs, pending=pending, locked=conn, stale_layout=stale)
        blobs, pending = start(plan, have)
        return _commit(store, plan, have=have, blobs=blobs, pending=pending, stale_layout=stale)

    def start(plan: SavePlan, have: Mapping[tuple[bytes, int], int]) -> tuple[list[PendingBlob], Future]:
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


def _warn_window_lost(store: Writer, plan: SavePlan, *, slots, leaves, have, captured) -> None:
    """Warn (once per store and model) when sliding-window chunks that already left the window are
    neither stored nor captured: the snapshot then restores only at exactly its length, never at an
    earlier chunk boundary (issue 15, item 3)."""
    model, keys, n = plan.model, plan.keys, int(plan.tokens.size)
    warned = store.window_warned
    if model in warned or not any(slot.kind == "rot" for slot in slots):
        return
    spans = chunk_spans(n, store.chunk_size)
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
    store: Writer,
    plan: SavePlan,
    *,
    have: Mapping[tuple[bytes, int], int],
    blobs: list[PendingBlob],
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


def _chain(plan: SavePlan, blobs: list[PendingBlob], now: float) -> Chain:
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
