"""The index's shared rows: every row write, and the lookups that save, import, fork and the Store facade use.

The read-only listings (agents, snapshots, settings) are plain SQL in kvstore.index.reads, so that read
commands run them without SQLAlchemy; fsck's and gc's scans are in their own index/ modules.

Each function runs in the caller's transaction (`db.transaction`); none opens its own. A model, agent,
snapshot, chunk, layer or blob row is inserted, changed or deleted here and nowhere else (the two size
columns of `chunks` are kept by kvstore.index.sizes), and a snapshot chain is committed only through
kvstore.index.commit, so a save, an import, a fork and fsck's repair cannot disagree on what a row holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Integer, Text, bindparam, cast, delete, func, insert, select, text, update

from kvstore.index import agent_chunks, db, removals, schema
from kvstore.index.layers import StoredLayers, whole_present
from kvstore.index.prepared import Prepared, PreparedIn, inserting
from kvstore.index.reads import NAMESPACE_KEY, WRITTEN_KEY

if TYPE_CHECKING:
    from kvstore.index.commit import LayerRow, NewSnapshot

__all__ = [
    "IN_BATCH",
    "batches",
    "existing_layers",
    "layers_present",
    "model_row",
    "model_layout",
    "model_in_use",
    "relayout_model",
    "record_namespace",
    "add_written",
    "namespace_model",
    "agent_namespace",
    "agent_row",
    "agent_fingerprint",
    "insert_agent",
    "save_agent_row",
    "insert_snapshot",
    "snapshot_row",
    "snapshot_keys",
    "set_head",
    "update_agent_meta",
    "delete_agent",
    "drop_blob_rows",
    "insert_blob_rows",
    "blob_rows_named",
    "insert_chunk_rows",
    "insert_layer_rows",
    "widen_layer_rows",
    "relist_snapshot",
    "drop_blobs",
    "drop_layer",
    "keep_damaged_meta",
    "head_to_newest",
]

# Values per IN (...) list: under SQLite's and PostgreSQL's bound-parameter limits with room to spare.
IN_BATCH = 400


def batches(seq: Iterable, n: int = IN_BATCH) -> Iterator[list]:
    """`seq` in lists of at most `n`, for `IN (...)` queries."""
    seq = list(seq)
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


_cl = schema.chunk_layers
_LAYERS_OF = PreparedIn(lambda keys: select(_cl.c.chunk_key, _cl.c.layer, _cl.c.first).where(_cl.c.chunk_key.in_(keys)))


def existing_layers(conn, keys: Sequence[bytes]) -> dict[tuple[bytes, int], int]:
    """{(chunk key, slot): first} for the keys the index already has."""
    rows = _LAYERS_OF.rows(conn, keys)
    if rows and type(rows[0][0]) is not bytes:  # psycopg hands back memoryview for bytea
        return {(bytes(k), layer): first for k, layer, first in rows}
    return {(k, layer): first for k, layer, first in rows}


_LAYER_COUNTS: dict[frozenset[int], PreparedIn] = {}


def _layer_count(within) -> Callable[[list], Any]:
    """The builder of a count of chunk_layers rows of some keys whose layer meets `within`."""

    def build(params: list) -> Any:
        return select(func.count()).select_from(_cl).where(_cl.c.chunk_key.in_(params), within)

    return build


def layers_present(conn, pairs: Iterable[tuple[bytes, int]]) -> bool:
    """Whether the index still has a layer row for every (chunk key, slot) of `pairs`.

    One count per set of slots that chunks share (usually one: every slot of the model): the rows
    counted are among those keys x those slots, each at most once (the primary key), so the count
    equals keys x slots exactly when none is missing. It counts in the database instead of fetching
    every row of a long history (issue 23).
    """
    if isinstance(pairs, StoredLayers):  # a save's plan: its whole chunks counted by key (kvstore.index.layers)
        return whole_present(conn, pairs) and layers_present(conn, pairs.rows)
    if not isinstance(pairs, (dict, set, frozenset)):  # a dict's keys are distinct already
        pairs = set(pairs)
    if not pairs:
        return True
    every_key, every_slot = {k for k, _ in pairs}, frozenset({s for _, s in pairs})
    groups: dict[frozenset[int], list[bytes]] = {}
    if len(pairs) == len(every_key) * len(every_slot):  # every key has every slot: one group
        groups[every_slot] = list(every_key)
    else:
        slots_of: dict[bytes, set[int]] = {}
        for key, slot in pairs:
            slots_of.setdefault(key, set()).add(slot)
        for key, held in slots_of.items():
            groups.setdefault(frozenset(held), []).append(key)
    for slots, keys in groups.items():
        count = _LAYER_COUNTS.get(slots)
        if count is None:  # the slots are ints of a layout: written into the statement, compiled once per set
            lo, hi = min(slots), max(slots)
            within = text(
                # A range scans each key's stretch of the primary key (4x faster than a seek per slot in SQLite)
                f"chunk_layers.layer BETWEEN {int(lo)} AND {int(hi)}"
                if len(slots) == hi - lo + 1
                else f"chunk_layers.layer IN ({', '.join(str(int(s)) for s in sorted(slots))})"
            )
            count = _LAYER_COUNTS[slots] = PreparedIn(_layer_count(within))
        # Parts of at most PreparedIn's widest hold distinct keys: the counts add up.
        if sum(n for (n,) in count.rows(conn, keys)) != len(keys) * len(slots):
            return False
    return True


# -- models ----------------------------------------------------------------------------------------


_m = schema.models
_MODEL_LAYOUT = Prepared(lambda _d: select(_m.c.layout).where(_m.c.fingerprint == bindparam("fp")))
_MODEL_ID_NAME = Prepared(lambda _d: select(_m.c.id, _m.c.name).where(_m.c.fingerprint == bindparam("fp")))
_INSERT_MODEL = inserting(_m, ("fingerprint", "name", "layout", "created"), returning=_m.c.id)


def model_layout(conn, fingerprint: str) -> str | None:
    """The cache layout (JSON text) recorded for a model fingerprint, or None for an unknown model."""
    return _MODEL_LAYOUT.scalar(conn, fp=fingerprint)


def model_row(conn, fingerprint: str, layout: str, now: float, name: str | None = None) -> int:
    """The row id of model `fingerprint`, inserting the model (with its layout) if it is new.

    A model first saved by its bare fingerprint gets `name` once a caller knows it.
    """
    m = schema.models
    row = _MODEL_ID_NAME.first(conn, fp=fingerprint)
    if row is not None:
        row_id, known = row
        if known is None and name is not None:
            conn.execute(update(m).where(m.c.id == row_id).values(name=name))
        return row_id
    return _INSERT_MODEL.scalar(conn, fingerprint=fingerprint, name=name, layout=layout, created=now)


def model_in_use(conn, fingerprint: str) -> bool:
    """Whether any agent, snapshot or chunk still belongs to model `fingerprint`."""
    m = schema.models
    row_id = conn.execute(select(m.c.id).where(m.c.fingerprint == fingerprint)).scalar()
    if row_id is None:
        return False
    return any(
        conn.execute(select(t.c.model_id).where(t.c.model_id == row_id).limit(1)).first() is not None
        for t in (schema.agents, schema.snapshots, schema.chunks)
    )


def relayout_model(conn, fingerprint: str, layout: str) -> None:
    """Give an unused model row another cache layout: a row nothing belongs to has no say over the model
    (an import of a crafted layout left one behind after `rm` and `gc`, refusing the real model's saves)."""
    m = schema.models
    conn.execute(update(m).where(m.c.fingerprint == fingerprint).values(layout=layout))


# -- imported namespaces -----------------------------------------------------------------------------
# An archive imported without trust lives under a fingerprint of its own (see ops.archive): its chunk
# keys never equal a locally computed chunk's, so no local save dedups against its KV and no restore
# of a local agent returns it. The store records which model each such namespace stands for, so the
# imported agent itself still loads, and continues, with the real model's fingerprint (NAMESPACE_KEY + the
# namespace's fingerprint -> the real one, in store_meta).


def record_namespace(conn, salted: str, fingerprint: str) -> None:
    """Record that model fingerprint `salted` holds an unverified import of model `fingerprint`."""
    db.insert_ignore(conn, schema.store_meta, [{"key": NAMESPACE_KEY + salted, "value": fingerprint}])


_sm = schema.store_meta


def add_written(conn, day: str, nbytes: int) -> None:
    """Add `nbytes` to the blob bytes written on `day` (UTC, YYYY-MM-DD): one row per day in store_meta.

    An increment in SQL, so two processes saving at once both count (PostgreSQL and SQLite alike).
    """
    key = WRITTEN_KEY + day
    db.insert_ignore(conn, _sm, [{"key": key, "value": "0"}])
    _ADD_WRITTEN.many(conn, [{"key": key, "n": int(nbytes)}])


_ADD_WRITTEN = Prepared(
    lambda _d: (
        update(_sm)
        .where(_sm.c.key == bindparam("key"))
        .values(value=cast(cast(_sm.c.value, BigInteger) + bindparam("n", type_=BigInteger), Text))
    )
)


def namespace_model(conn, salted: str) -> str | None:
    """The model an imported namespace stands for; None for an ordinary fingerprint."""
    return db.meta_value(conn, NAMESPACE_KEY + salted)


def agent_namespace(conn, name: str, fingerprint: str) -> str:
    """The fingerprint agent `name`'s KV lives under, for a caller holding model `fingerprint`:
    an unverified import's own namespace, or `fingerprint` itself."""
    owner = agent_fingerprint(conn, name)
    if owner is not None and owner != fingerprint and namespace_model(conn, owner) == fingerprint:
        return owner
    return fingerprint


# -- agents and snapshots --------------------------------------------------------------------------


def agent_row(conn, name: str):
    """The agents row of `name` (every column), or None."""
    a = schema.agents
    return conn.execute(select(a).where(a.c.name == name)).first()


_a, _s, _sc = schema.agents, schema.snapshots, schema.snapshot_chunks
_AGENT_FINGERPRINT = Prepared(
    lambda _d: (
        select(_m.c.fingerprint)
        .select_from(_a.join(_m, _a.c.model_id == _m.c.id))
        .where(_a.c.name == bindparam("name"))
    )
)
_AGENT_ID = Prepared(lambda _d: select(_a.c.id).where(_a.c.name == bindparam("name")))
_INSERT_AGENT = inserting(_a, ("name", "model_id", "meta", "created", "updated"), returning=_a.c.id)
_INSERT_SNAPSHOT = inserting(
    _s, ("agent_id", "model_id", "n_tokens", "tokens", "created", "label", "pinned"), returning=_s.c.id
)
_INSERT_SNAPSHOT_CHUNK = inserting(_sc, ("snapshot_id", "seq", "chunk_key"))
_SET_HEAD = Prepared(lambda _d: update(_a).where(_a.c.id == bindparam("agent_id")).values(head=bindparam("head")))
_SET_HEAD_UPDATED = Prepared(
    lambda _d: (
        update(_a).where(_a.c.id == bindparam("agent_id")).values(head=bindparam("head"), updated=bindparam("updated"))
    )
)


def agent_fingerprint(conn, name: str) -> str | None:
    """The model fingerprint agent `name` belongs to, or None if there is no such agent."""
    return _AGENT_FINGERPRINT.scalar(conn, name=name)


def insert_agent(conn, name: str, model_row_id: int, meta_json: str, created: float, updated: float) -> int:
    """A new agent row (no head yet: `set_head` once its snapshots are in); returns its id."""
    return _INSERT_AGENT.scalar(
        conn, name=name, model_id=model_row_id, meta=meta_json, created=created, updated=updated
    )


def save_agent_row(conn, name: str, model_row_id: int, meta_json: str | None, now: float) -> int:
    """The id of agent `name` for a save: created if new; its metadata replaced if `meta_json` is given."""
    a = schema.agents
    row_id = _AGENT_ID.scalar(conn, name=name)
    if row_id is None:
        return insert_agent(conn, name, model_row_id, meta_json or "{}", now, now)
    if meta_json is not None:
        conn.execute(update(a).where(a.c.id == row_id).values(meta=meta_json))
    return row_id


def move_agent(conn, agent_id: int, model_row_id: int) -> None:
    """Give agent `agent_id` to another model row (an agent manager's cache changed representation)."""
    a = schema.agents
    conn.execute(update(a).where(a.c.id == agent_id, a.c.model_id != model_row_id).values(model_id=model_row_id))


def insert_snapshot(conn, snapshot: NewSnapshot, *, agent_id: int, model_row_id: int) -> int:
    """A snapshot row and its chunk list (its keys in order); returns the snapshot's id."""
    keys = snapshot.keys
    snap_id = _INSERT_SNAPSHOT.scalar(
        conn,
        agent_id=agent_id,
        model_id=model_row_id,
        n_tokens=int(snapshot.tokens.size),
        tokens=snapshot.tokens.tobytes(),
        created=snapshot.created,
        label=snapshot.label,
        pinned=bool(snapshot.pinned),
    )
    # A turn extends the agent's head: its list's common part is copied in the database, and only the
    # chunks after it are new to the agent (agent_chunks already has the head's).
    same = _shared_with_head(conn, agent_id, keys)
    if same:
        _COPY_HEAD_LIST.many(conn, [{"snapshot_id": snap_id, "agent_id": agent_id, "n": same}])
    _INSERT_SNAPSHOT_CHUNK.many(
        conn, [{"snapshot_id": snap_id, "seq": i, "chunk_key": keys[i]} for i in range(same, len(keys))]
    )
    agent_chunks.list_chunks(conn, agent_id, keys[same:])
    return snap_id


def _shared_with_head(conn, agent_id: int, keys: Sequence[bytes]) -> int:
    """How many leading chunks `keys` shares with the agent's head's list (0: no head).

    The head's whole list is read and compared, not only its last keys: a list damaged in the middle
    is then not copied into the new snapshot (which writes its own rows from that chunk on)."""
    return _common_prefix(keys, [bytes(k) for (k,) in _HEAD_KEYS.rows(conn, agent_id=agent_id)])


def _common_prefix(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i in range(n) if a[i] != b[i])


_HEAD_KEYS = Prepared(
    lambda _d: (
        select(_sc.c.chunk_key)
        .select_from(_a.join(_sc, _sc.c.snapshot_id == _a.c.head))
        .where(_a.c.id == bindparam("agent_id"))
        .order_by(_sc.c.seq)
    )
)
_COPY_HEAD_LIST = Prepared(
    lambda _d: insert(_sc).from_select(
        ["snapshot_id", "seq", "chunk_key"],
        select(cast(bindparam("snapshot_id"), Integer), _sc.c.seq, _sc.c.chunk_key).where(
            _sc.c.snapshot_id == select(_a.c.head).where(_a.c.id == bindparam("agent_id")).scalar_subquery(),
            _sc.c.seq < bindparam("n"),
        ),
    )
)


def snapshot_row(conn, snapshot_id: int):
    """The snapshots row `snapshot_id` (every column), or None."""
    s = schema.snapshots
    return conn.execute(select(s).where(s.c.id == snapshot_id)).first()


def snapshot_keys(conn, snapshot_id: int) -> list[bytes]:
    """A snapshot's chunk keys, in order."""
    sc = schema.snapshot_chunks
    return [
        bytes(k)
        for (k,) in conn.execute(select(sc.c.chunk_key).where(sc.c.snapshot_id == snapshot_id).order_by(sc.c.seq))
    ]


def set_head(conn, agent_id: int, snapshot_id: int, updated: float | None = None) -> None:
    """Make `snapshot_id` the agent's head (and stamp `updated`, if given)."""
    if updated is None:
        _SET_HEAD.many(conn, [{"agent_id": agent_id, "head": snapshot_id}])
    else:
        _SET_HEAD_UPDATED.many(conn, [{"agent_id": agent_id, "head": snapshot_id, "updated": updated}])


def update_agent_meta(conn, name: str, meta: dict, now: float) -> bool:
    """Replace agent `name`'s metadata; False if there is no such agent."""
    a = schema.agents
    return bool(
        conn.execute(
            update(a).where(a.c.name == name).values(meta=json.dumps(meta, sort_keys=True, default=str), updated=now)
        ).rowcount
    )


def delete_agent(conn, name: str) -> bool:
    """Delete an agent, its snapshots and their chunk lists (not the chunks: gc decides); False if absent."""
    a, s, sc = schema.agents, schema.snapshots, schema.snapshot_chunks
    row_id = conn.execute(select(a.c.id).where(a.c.name == name)).scalar()
    if row_id is None:
        return False
    snaps = select(s.c.id).where(s.c.agent_id == row_id)
    conn.execute(delete(sc).where(sc.c.snapshot_id.in_(snaps)))
    conn.execute(delete(schema.agent_chunks).where(schema.agent_chunks.c.agent_id == row_id))
    conn.execute(delete(s).where(s.c.agent_id == row_id))
    conn.execute(delete(a).where(a.c.id == row_id))
    return True


def drop_blob_rows(conn, blob_id: str) -> tuple[int, list[bytes]]:
    """Delete a blob's row and every layer row naming it: (layer rows removed, their chunk keys)."""
    cl, b = schema.chunk_layers, schema.blobs
    keys = [bytes(k) for (k,) in conn.execute(select(cl.c.chunk_key).where(cl.c.blob_id == blob_id))]
    n = conn.execute(delete(cl).where(cl.c.blob_id == blob_id)).rowcount
    conn.execute(delete(b).where(b.c.id == blob_id))
    if n:
        removals.changed(conn)
    return n, keys


# -- blobs, chunks and layer rows (written by kvstore.index.commit) ---------------------------------


def insert_blob_rows(conn, sizes: dict[str, int], now: float) -> None:
    """A row for each blob of `sizes` (id -> bytes) the index lacks."""
    db.insert_ignore(conn, schema.blobs, [{"id": b, "nbytes": n, "created": now} for b, n in sizes.items()])


def blob_rows_named(conn, blob_ids: Sequence[str]) -> set[str]:
    """The ids among `blob_ids` that have a blob row."""
    b = schema.blobs
    named: set[str] = set()
    for part in batches(blob_ids):
        named |= {i for (i,) in conn.execute(select(b.c.id).where(b.c.id.in_(part)))}
    return named


def insert_chunk_rows(conn, rows: list[dict]) -> None:
    """Chunk rows (key, model_id, seq, length, parent, nbytes, prefix_bytes) the index lacks."""
    db.insert_ignore(conn, schema.chunks, rows)


def insert_layer_rows(conn, rows: Sequence[LayerRow]) -> None:
    """(chunk, layer) -> blob rows the index lacks."""
    db.insert_ignore(conn, _cl, [r._asdict() for r in rows])


def widen_layer_rows(conn, rows: Sequence[LayerRow]) -> None:
    """Each row replaces the stored one of its (chunk, layer) if it holds more of the chunk (a smaller
    `first`: a fuller piece of a sliding-window chunk)."""
    for r in rows:
        conn.execute(
            update(_cl)
            .where(_cl.c.chunk_key == r.chunk_key, _cl.c.layer == r.layer, _cl.c.first > r.first)
            .values(blob_id=r.blob_id, first=r.first)
        )


def relist_snapshot(conn, snapshot_id: int, n_tokens: int, keys: Sequence[bytes]) -> None:
    """Replace a snapshot's chunk list and token count (fsck rebuilding them from its token ids)."""
    conn.execute(delete(_sc).where(_sc.c.snapshot_id == snapshot_id))
    conn.execute(update(_s).where(_s.c.id == snapshot_id).values(n_tokens=int(n_tokens)))
    _INSERT_SNAPSHOT_CHUNK.many(
        conn, [{"snapshot_id": snapshot_id, "seq": i, "chunk_key": k} for i, k in enumerate(keys)]
    )
    agent_id = conn.execute(select(_s.c.agent_id).where(_s.c.id == snapshot_id)).scalar_one()
    agent_chunks.list_chunks(conn, agent_id, keys)
    agent_chunks.unlist(conn, [agent_id])


# -- fsck's repairs --------------------------------------------------------------------------------


def drop_blobs(conn, blob_ids: Sequence[str]) -> None:
    """Delete these blobs' rows and every layer row naming them."""
    b = schema.blobs
    if blob_ids:
        removals.changed(conn)
    for part in batches(blob_ids):
        conn.execute(delete(_cl).where(_cl.c.blob_id.in_(part)))
        conn.execute(delete(b).where(b.c.id.in_(part)))


def drop_layer(conn, chunk_key: bytes, layer: int) -> None:
    """Delete one (chunk, layer) row."""
    removals.changed(conn)
    conn.execute(delete(_cl).where(_cl.c.chunk_key == chunk_key, _cl.c.layer == layer))


def keep_damaged_meta(conn, name: str) -> None:
    """Replace agent `name`'s unparsable metadata by {"damaged_meta": the old text}, where a person can
    still read it."""
    raw = conn.execute(select(_a.c.meta).where(_a.c.name == name)).scalar_one()
    conn.execute(update(_a).where(_a.c.name == name).values(meta=json.dumps({"damaged_meta": raw})))


def head_to_newest(conn, name: str) -> None:
    """Point agent `name`'s head at its newest snapshot (none: no head)."""
    newest = select(func.max(_s.c.id)).where(_s.c.agent_id == _a.c.id).scalar_subquery()
    conn.execute(update(_a).where(_a.c.name == name).values(head=newest))
