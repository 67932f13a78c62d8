"""Committing a snapshot chain into the index: the one path save, import, fork and fsck repair write through.

A commit runs in the caller's write transaction (`db.transaction(write=True)`), after the caller has
checked its own preconditions there (an agent name still free, a model's layout) and before it makes its
blobs durable and commits (the write protocol's step 3: docs/ARCHITECTURE.md, "Write protocol"). In
order it re-checks that the layer rows the plan reuses are still there (a gc may have run since: `Retry`),
then writes the model row, the blob rows, the chunk rows with their sizes and parents, the layer rows, the
agent, the snapshots and the head. The caller's optimistic loop is `retrying`: plan, write the blobs,
commit; plan again on `Retry`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from kvstore.errors import StoreError
from kvstore.index import queries, removals, sizes
from kvstore.index.layers import StoredLayers

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Retry",
    "retrying",
    "LayerRow",
    "ModelEntry",
    "ModelRow",
    "AgentEntry",
    "NewSnapshot",
    "Relisted",
    "Chain",
    "commit_chain",
]

T = TypeVar("T")


class Retry(Exception):
    """Something a commit relied on changed since it was planned (a concurrent gc or save): plan again."""


def retrying(attempt: Callable[[int], T], *, attempts: int, gave_up: str) -> T:
    """`attempt(n)` for n = 0, 1, ... until one returns without `Retry`; StoreError(`gave_up`) after `attempts`."""
    for n in range(attempts):
        try:
            return attempt(n)
        except Retry:
            continue
    raise StoreError(gave_up)


class LayerRow(NamedTuple):
    """One (chunk, layer) -> blob row."""

    chunk_key: bytes
    layer: int  # slot: the leaf cache's place in the model's layout
    blob_id: str
    first: int  # leading tokens of the chunk the blob lacks (a sliding-window layer may hold only a tail)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """The model a chain belongs to, its row inserted if new."""

    fingerprint: str  # the one the chain's chunk keys derive from
    layout: str  # the cache layout, JSON text (kept by a new row)
    name: str | None = None  # a human hint, given to a row that has none
    stands_for: str | None = None  # an unverified import's namespace: the real model's fingerprint


class ModelRow(NamedTuple):
    """A model row the index already has (fsck re-listing a snapshot of it)."""

    id: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """The agent whose snapshots a chain adds."""

    name: str
    meta_json: str | None  # its metadata, JSON text; None keeps what an existing agent has
    created: float
    updated: float  # also stamped when its head moves
    new: bool  # True: the caller checked no such agent exists (import, fork); False: created if new (save)
    moves: bool = False  # give an existing agent of another model row to this one (the caller checked it may)


@dataclass(frozen=True, slots=True)
class NewSnapshot:
    """A snapshot to add: its token ids (primary data) and the chunk keys they derive."""

    tokens: np.ndarray  # uint32 token ids
    keys: Sequence[bytes]  # chunk keys of `tokens`, in order
    created: float
    label: str | None = None
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Relisted:
    """An existing snapshot whose chunk list (and token count) is rebuilt from its token ids (fsck repair)."""

    snapshot_id: int
    tokens: np.ndarray
    keys: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class Chain:
    """What one commit writes: snapshots of one model, the chunks and layer rows they need, the agent's head."""

    model: ModelEntry | ModelRow
    agent: AgentEntry | None  # None: only Relisted snapshots, no agent row changes
    snapshots: Sequence[NewSnapshot | Relisted]
    head: int | None = None  # index in `snapshots` of the agent's new head; None leaves the head
    layers: Sequence[LayerRow] = ()  # the layer rows this commit adds (or widens)
    blobs: Mapping[str, int] = field(default_factory=dict)  # id -> bytes of every blob `layers` name


def commit_chain(
    conn, chain: Chain, *, chunk_size: int, now: float, reused: Collection[tuple[bytes, int]] = ()
) -> list[int]:
    """Write `chain` in the caller's write transaction; returns its snapshots' ids, in order.

    `reused` is the (chunk key, layer) pairs the plan found in the index and does not write again:
    if one is gone (a gc ran since), raises Retry before anything is written. The check is presence,
    counted in the database (`queries.layers_present`: a save late in a long chat reuses thousands of
    rows): a row that stays only ever comes to hold more of its chunk (`widen_layer_rows`); one that a
    gc removed and another save put back may hold less of a sliding-window chunk, which restores a
    shorter prefix, never a wrong one. A save's plan (`StoredLayers`) carries the removals token it was
    looked up under: if the index's token is still that one, nothing was removed since, and the count
    is skipped (kvstore.index.removals).
    """
    present: frozenset[bytes] = frozenset()  # chunk keys known to be in the index: no need to look them up
    if reused:
        token = reused.token if isinstance(reused, StoredLayers) else None
        if (token is None or removals.token(conn) != token) and not queries.layers_present(conn, reused):
            raise Retry()
        if isinstance(reused, StoredLayers):
            present = reused.whole
    model = chain.model
    if isinstance(model, ModelRow):
        model_id = model.id
    else:
        if model.stands_for is not None:
            queries.record_namespace(conn, model.fingerprint, model.stands_for)
        model_id = queries.model_row(conn, model.fingerprint, model.layout, now, name=model.name)
    queries.insert_blob_rows(conn, dict(chain.blobs), now)
    _add_chunks(conn, chain, model_id=model_id, fingerprint=model.fingerprint, chunk_size=chunk_size, present=present)
    agent_id = None if chain.agent is None else _agent(conn, chain.agent, model_id)
    ids = []
    for sn in chain.snapshots:
        if isinstance(sn, Relisted):
            queries.relist_snapshot(conn, sn.snapshot_id, int(sn.tokens.size), sn.keys)
            ids.append(sn.snapshot_id)
            continue
        if agent_id is None:
            raise ValueError("a new snapshot needs its agent")
        ids.append(queries.insert_snapshot(conn, sn, agent_id=agent_id, model_row_id=model_id))
    if chain.agent is not None and agent_id is not None and chain.head is not None:
        queries.set_head(conn, agent_id, ids[chain.head], updated=chain.agent.updated)
    return ids


def _agent(conn, agent: AgentEntry, model_id: int) -> int:
    if agent.new:
        return queries.insert_agent(conn, agent.name, model_id, agent.meta_json or "{}", agent.created, agent.updated)
    agent_id = queries.save_agent_row(conn, agent.name, model_id, agent.meta_json, agent.created)
    if agent.moves:
        queries.move_agent(conn, agent_id, model_id)
    return agent_id


def _add_chunks(
    conn,
    chain: Chain,
    *,
    model_id: int,
    fingerprint: str,
    chunk_size: int,
    present: frozenset[bytes] = frozenset(),
) -> None:
    """Insert the chunk rows of the chain's snapshots and its layer rows, with their sizes.

    Each snapshot's chunk keys run from chunk 0. Layer rows of chunks the index already has
    are added first (a row holding more of a chunk, a smaller `first`, replaces the stored one) and
    their sizes refreshed; then the new chunks go in with sizes taken from their layer rows and their
    parents' prefix bytes (kvstore.index.sizes). `present`: keys the caller knows the index has (only
    the others are looked up: a turn's save late in a chat knows nearly all of its chain).
    """
    root = bytes.fromhex(fingerprint)
    place: dict[bytes, tuple[int, bytes, int]] = {}  # key -> (seq, parent, the snapshot's token count)
    for sn in chain.snapshots:
        keys, n = sn.keys, int(sn.tokens.size)
        for i, key in enumerate(keys):
            if key not in present and key not in place:
                place[key] = (i, keys[i - 1] if i else root, n)
    # Which chunks are stored, with their prefix bytes (a new chunk's parent may be one of them).
    stored = sizes.prefix_bytes(conn, list(place))
    have = stored.keys() | present
    old_rows = [r for r in chain.layers if r.chunk_key in have]
    new_rows = [r for r in chain.layers if r.chunk_key not in have]
    if old_rows:
        queries.insert_layer_rows(conn, old_rows)
        queries.widen_layer_rows(conn, old_rows)
        sizes.refresh(conn, {r.chunk_key for r in old_rows})
    fresh = [k for k in place if k not in have]
    if not fresh:
        return
    blobs_of: dict[bytes, set[str]] = {}
    for r in new_rows:
        blobs_of.setdefault(r.chunk_key, set()).add(r.blob_id)
    prefix: dict[bytes, int] = {root: 0}
    stored_parents = {place[k][1] for k in fresh} & have
    if old_rows:  # refresh() above may have changed the prefix bytes of stored chunks
        stored = sizes.prefix_bytes(conn, sorted(stored_parents))
    elif stored_parents - stored.keys():  # parents among `present`, not looked up above
        stored.update(sizes.prefix_bytes(conn, sorted(stored_parents - stored.keys())))
    prefix.update((k, stored[k]) for k in stored_parents)
    rows = []
    for key in sorted(fresh, key=lambda k: place[k][0]):  # parents before children
        seq, parent, n_tokens = place[key]
        nbytes = sum(chain.blobs[b] for b in blobs_of.get(key, ()))
        prefix[key] = prefix[parent] + nbytes
        rows.append(
            {
                "key": key,
                "model_id": model_id,
                "seq": seq,
                "length": min(chunk_size, n_tokens - seq * chunk_size),
                "parent": parent,
                "nbytes": nbytes,
                "prefix_bytes": prefix[key],
            }
        )
    queries.insert_chunk_rows(conn, rows)
    queries.insert_layer_rows(conn, new_rows)
