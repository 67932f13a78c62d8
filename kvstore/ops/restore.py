"""The read path: find the longest stored prefix, read and check its blobs, build mlx-lm caches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx
import numpy as np
import xxhash
from sqlalchemy import bindparam, select

from kvstore.blob import tensorfile
from kvstore.blob.scatter import ScatterReader
from kvstore.cache import codec
from kvstore.cache.keys import chunk_keys, chunk_spans, tokens_from_bytes, tokens_to_array
from kvstore.cache.leaves import arrays_of
from kvstore.errors import (
    CorruptBlobError,
    IndexDatabaseError,
    MissingBlobError,
    ModelMismatchError,
    StoreError,
    TokenMismatchError,
    UnknownAgentError,
)
from kvstore.index import db, queries, schema
from kvstore.index.prepared import Prepared
from kvstore.index.queries import batches
from kvstore.records import Match

if TYPE_CHECKING:
    from kvstore.store import Store


def _layers(conn, keys: list[bytes]) -> dict[tuple[bytes, int], tuple[str, int]]:
    """{(chunk key, slot): (blob id, first)} for the given keys."""
    cl = schema.chunk_layers
    out = {}
    for part in batches(keys):
        rows = conn.execute(  # .all(): one fetch, not one per row (a row per chunk and layer)
            select(cl.c.chunk_key, cl.c.layer, cl.c.blob_id, cl.c.first).where(cl.c.chunk_key.in_(part))
        ).all()
        out.update({(bytes(k), layer): (blob_id, first) for k, layer, blob_id, first in rows})
    return out


_sc, _cl = schema.snapshot_chunks, schema.chunk_layers
_SNAPSHOT_LAYERS = Prepared(
    lambda _d: (
        select(_sc.c.seq, _sc.c.chunk_key, _cl.c.layer, _cl.c.blob_id, _cl.c.first)
        .select_from(_sc.outerjoin(_cl, _cl.c.chunk_key == _sc.c.chunk_key))
        .where(_sc.c.snapshot_id == bindparam("snapshot_id"))
        .order_by(_sc.c.seq)
    )
)


def _snapshot_layers(conn, snapshot_id: int) -> tuple[list[bytes], dict[tuple[bytes, int], tuple[str, int]]]:
    """A snapshot's chunk keys in order, and _layers() of them, in one query (a load's largest)."""
    rows = _SNAPSHOT_LAYERS.rows(conn, snapshot_id=snapshot_id)
    keys: dict[int, bytes] = {}
    layers = {}
    for seq, key, layer, blob_id, first in rows:
        key = keys.get(seq) or keys.setdefault(seq, bytes(key))
        if layer is not None:  # a chunk whose layers fsck --repair removed: load reports it
            layers[(key, layer)] = (blob_id, first)
    return list(keys.values()), layers


def _model_layout(conn, model: str):
    row = conn.execute(select(schema.models.c.layout).where(schema.models.c.fingerprint == model)).first()
    if row is None:
        return None
    return _parse_layout(row.layout, model)


def _parse_layout(text, model: str):
    try:
        return codec.layout_from_json(db.parse_json(text, f"model {model}'s cache layout"))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
        raise IndexDatabaseError(
            f"the index holds a damaged cache layout for model {model}; restore index.db from a backup"
        ) from e


def plan(slots, keys: list[bytes], spans, n_tokens: int, layers: dict) -> list[list[tuple[str, int, int]]] | None:
    """Per slot, the blobs (id, first, chunk start) that rebuild it at n_tokens; None if one is missing."""
    if n_tokens == 0:
        return [[] for _ in slots]
    last = next(i for i, (s, ln) in enumerate(spans) if s + ln == n_tokens)
    out = []
    for s, slot in enumerate(slots):
        if slot.kind == "state":
            hit = layers.get((keys[last], s))
            if hit is None:
                return None
            out.append([(hit[0], 0, spans[last][0])])
            continue
        need_from = codec.window_start(slot, n_tokens) if slot.kind == "rot" else 0
        got = []
        for i in range(last + 1):
            start, length = spans[i]
            if start + length <= need_from:
                continue
            hit = layers.get((keys[i], s))
            if hit is None or start + hit[1] > max(need_from, start):
                return None
            got.append((hit[0], hit[1], start))
        out.append(got)
    return out


def longest(slots, keys, spans, layers, n_max: int | None = None) -> int:
    """The longest chunk end (at most n_max) at which every slot can be rebuilt.

    A state slot (recurrent state) is rebuilt only from a checkpoint stored under the key of the
    chunk the position ends: a hybrid model's prefix lands on the longest boundary that has every
    attention chunk and a checkpoint of every state slot. Boundaries without one are skipped before
    the full plan is tried (a long prefix has checkpoints at a few boundaries only).
    """
    limit = len(spans)
    for s, slot in enumerate(slots):  # a full-attention slot needs an unbroken run from chunk 0
        if slot.kind == "kv":
            i = 0
            while i < limit and (keys[i], s) in layers:
                i += 1
            limit = i
    states = [s for s, slot in enumerate(slots) if slot.kind == "state"]
    for i in range(limit - 1, -1, -1):
        n = spans[i][0] + spans[i][1]
        if (n_max is not None and n > n_max) or any((keys[i], s) not in layers for s in states):
            continue
        if plan(slots, keys, spans, n, layers) is not None:
            return n
    return 0


def build_cache(store: Store, tree, slots, plan_, n_tokens: int, agent: str | None) -> list:
    """The cache rebuilt from its blobs: positional layers scatter-read, state layers decoded."""
    starts = {s: codec.window_start(slot, n_tokens) if slot.kind == "rot" else 0 for s, slot in enumerate(slots)}
    spans = {s: (o, n_tokens - o) for s, o in starts.items()}
    # A remote store fetches what its disk tier lacks first; the reader then hashes what it reads there.
    where = store.blobs.local_paths({b for blobs in plan_ for b, _f, _s in blobs}, agent)
    rd = ScatterReader(
        where, spans, agent, store.io, windowed=frozenset(s for s, slot in enumerate(slots) if slot.kind == "rot")
    )
    for s, (slot, blobs) in enumerate(zip(slots, plan_)):
        if slot.kind != "state":
            for blob_id, first, start in blobs:
                rd.add(blob_id, s, start + first)
    arrays = rd.run()
    leaves = []
    for s, (slot, blobs) in enumerate(zip(slots, plan_)):
        if slot.kind == "state":
            pieces, state_meta = [], None
            for blob_id, _first, _start in blobs:
                got, state_meta = tensorfile.decode(store.blobs.read(blob_id, agent), blob_id)
                at = codec.state_position(state_meta)
                if at is not None and at != n_tokens:  # never a state at a position it was not taken at
                    raise CorruptBlobError(
                        f"blob {blob_id} holds layer {s}'s state after {at} tokens, but the index names it "
                        f"for position {n_tokens} (a damaged index): nothing was restored; the agent manager "
                        "recomputes it, or restore index.db from a backup",
                        blob_id,
                        agent,
                    )
                pieces.append(got)
            leaf = codec.build_leaf(slot, pieces, n_tokens, state_meta)
        else:
            leaf = codec.build_leaf(slot, [arrays[s]] if s in arrays else [], n_tokens)
        leaves.append(leaf)
    mx.eval(arrays_of(leaves))
    return codec.build(tree, leaves)


class _SnapshotRow(NamedTuple):
    id: int
    n_tokens: int
    tokens: bytes
    fingerprint: str
    layout: str
    name: str
    meta: str


def _snapshot_query(which):
    a, s, m = schema.agents, schema.snapshots, schema.models
    return Prepared(
        lambda _d: (
            select(s.c.id, s.c.n_tokens, s.c.tokens, m.c.fingerprint, m.c.layout, a.c.name, a.c.meta)
            .select_from(a.join(s, s.c.agent_id == a.c.id).join(m, s.c.model_id == m.c.id))
            .where(a.c.name == bindparam("name"), which(s, a))
        )
    )


_HEAD_SNAPSHOT = _snapshot_query(lambda s, a: s.c.id == a.c.head)
_NAMED_SNAPSHOT = _snapshot_query(lambda s, _a: s.c.id == bindparam("snapshot_id"))


def head_snapshot(conn, name: str, snapshot_id: int | None = None) -> _SnapshotRow:
    if snapshot_id is None:
        row = _HEAD_SNAPSHOT.first(conn, name=name)
    else:
        row = _NAMED_SNAPSHOT.first(conn, name=name, snapshot_id=snapshot_id)
    if row is not None:
        return _SnapshotRow(*row)
    if queries.agent_row(conn, name) is None:
        raise UnknownAgentError(f"no agent named {name!r} in this store")
    raise UnknownAgentError(
        f"agent {name!r} has no snapshot {snapshot_id}"
        if snapshot_id is not None
        else f"agent {name!r} has no saved snapshot"
    )


def head(store: Store, name: str) -> tuple[str, dict, list[int]]:
    """(model fingerprint, meta, tokens) of an agent's head snapshot, in one query.

    The agent manager's `get` on resume: store.agent() also counts snapshots (a grouped scan).
    """
    with db.transaction(store.engine, write=False, what=f"reading agent {name!r}") as conn:
        row = head_snapshot(conn, name)
        # an agent imported without trust lives in its archive's namespace; its owner is the real model
        model = queries.namespace_model(conn, row.fingerprint) or row.fingerprint
    return model, db.parse_json(row.meta, f"agent {name!r}'s metadata"), _snapshot_tokens(row, name)


def _snapshot_tokens(row, name: str) -> list[int]:
    """A head_snapshot row's token ids, checked against the count it records."""
    tokens = tokens_from_bytes(row.tokens)
    if len(tokens) != row.n_tokens:
        raise TokenMismatchError(
            f"agent {name!r}: snapshot {row.id} records {row.n_tokens} tokens but stores {len(tokens)} token ids"
        )
    return tokens


READ_ATTEMPTS = 5


def _reread(store: Store, read):
    """Run `read`; when a blob it planned on vanished because a concurrent gc dropped the rows naming it
    (the agent moved on to a new head), plan and read again. A blob the index still names is really gone.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except CorruptBlobError as e:
            # A damaged copy in an S3 store's disk tier: drop it and fetch the bucket's (once per blob).
            if attempt == READ_ATTEMPTS - 1 or not store.blobs.forget_local(e.blob_id):
                raise
        except MissingBlobError as e:
            if attempt == READ_ATTEMPTS - 1 or not e.blob_id:
                raise
            with db.transaction(store.engine, write=False, what="re-checking a blob") as conn:
                named = (
                    conn.execute(
                        select(schema.chunk_layers.c.layer).where(schema.chunk_layers.c.blob_id == e.blob_id).limit(1)
                    ).first()
                    is not None
                )
            if named and not store.blobs.exists(e.blob_id):
                raise


def load(store: Store, name: str, model: str | None, snapshot_id: int | None):
    """(cache, tokens) of a snapshot; see _load_once."""
    return _reread(store, lambda: _load_once(store, name, model, snapshot_id))


def _load_once(store: Store, name: str, model: str | None, snapshot_id: int | None):
    with db.transaction(store.engine, write=False, what=f"loading agent {name!r}") as conn:
        row = head_snapshot(conn, name, snapshot_id)
        if model is not None and row.fingerprint != model and queries.namespace_model(conn, row.fingerprint) != model:
            raise ModelMismatchError(
                f"agent {name!r} was saved with model {row.fingerprint}, not {model}: its cache cannot be used"
            )
        tokens = _snapshot_tokens(row, name)
        stored, layers = _snapshot_layers(conn, row.id)
    # Hashed from the stored bytes, already in the hashed form: a 4,096-token list costs ~0.17 ms to convert.
    keys = chunk_keys(row.fingerprint, np.frombuffer(row.tokens, dtype="<u4"), store.chunk_size)
    if stored != keys:
        # Never trust a hash alone: the token ids must re-derive the very chunks the snapshot names.
        raise TokenMismatchError(
            f"agent {name!r}: snapshot {row.id}'s token ids do not match its chunks; run `kvstore fsck`"
        )
    tree, slots = _parse_layout(row.layout, row.fingerprint)
    spans = chunk_spans(len(tokens), store.chunk_size)
    p = plan(slots, keys, spans, len(tokens), layers)
    if p is None:
        whole = longest(slots, keys, spans, layers)
        raise MissingBlobError(
            f"agent {name!r}: snapshot {row.id}'s KV is whole for its first {whole} of {len(tokens)} tokens only "
            "(damaged blobs were dropped by fsck --repair or a recovery); restore() gives those, "
            "the rest must be recomputed from its tokens (the agent manager does)",
            "",
            name,
        )
    return build_cache(store, tree, slots, p, len(tokens), name), tokens


def match(store: Store, tokens: Any, model: str, limit: int | None = None) -> tuple[Match, Any]:
    """The longest stored, token-verified prefix of `tokens` (at most `limit` tokens); and its plan."""
    toks = tokens_to_array(tokens)
    if limit is not None:
        toks = toks[:limit]
    keys = chunk_keys(model, toks, store.chunk_size)
    spans = chunk_spans(int(toks.size), store.chunk_size)
    with db.transaction(store.engine, write=False, what="matching a prefix") as conn:
        layout = _model_layout(conn, model)
        if layout is None or not keys:
            return Match(0, model), None
        layers = _layers(conn, keys)
        n = longest(layout[1], keys, spans, layers)
        keys, spans, layers, n = _stored_tail(conn, layout[1], model, toks, keys, spans, layers, n, store.chunk_size)
        while n:
            verified = _verify_prefix(conn, keys, spans, toks, n)
            if verified == n:
                break
            n = longest(layout[1], keys, spans, layers, n_max=verified)
    if n == 0:
        return Match(0, model), None
    n_chunks = next(i for i, (s, ln) in enumerate(spans) if s + ln == n) + 1
    return Match(n, model, n_chunks, tuple(keys[:n_chunks])), (layout, plan(layout[1], keys, spans, n, layers))


def _stored_tail(conn, slots, model, toks, keys, spans, layers, n: int, chunk_size: int):
    """Extend a match by a stored partial chunk that the request continues, if that reaches further.

    An agent saved at 149 tokens keys its last 5 tokens as a chunk of its own; a longer request
    chunks them into a full chunk with another key. Chunks record their parent, so the stored tail
    is found by its parent and re-hashed over the request's tokens. It is looked for after every
    chunk boundary from n on, not only after n: a sliding-window cache saved after a plain prefill
    can rebuild no earlier boundary (its window chunks were never captured), only its whole length
    (issue 15, item 3: a Gemma-style continuation restored nothing).
    """
    if n >= toks.size:
        return keys, spans, layers, n
    full = int(toks.size) // chunk_size
    # The tail after boundary j * chunk_size is chunk j, its parent keys[j - 1] (the model for j = 0).
    parents = {(keys[j - 1] if j else bytes.fromhex(model)): j for j in range(n // chunk_size, full + 1)}
    c = schema.chunks
    tails = []
    for part in batches(parents):
        for key, length, parent, seq in conn.execute(
            select(c.c.key, c.c.length, c.c.parent, c.c.seq).where(c.c.parent.in_(part), c.c.length < chunk_size)
        ).all():
            j = parents[bytes(parent)]
            if seq == j:
                tails.append((j * chunk_size + length, j, bytes(key), length, bytes(parent)))
    for end, j, key, length, parent in sorted(tails, reverse=True):
        start = j * chunk_size
        if end <= n or end > toks.size or xxhash.xxh3_128_digest(parent + toks[start:end].tobytes()) != key:
            continue
        alt_keys, alt_spans = keys[:j] + [key], spans[:j] + [(start, length)]
        alt_layers = {**layers, **_layers(conn, [key])}
        if plan(slots, alt_keys, alt_spans, end, alt_layers) is not None:
            return alt_keys, alt_spans, alt_layers, end
    return keys, spans, layers, n


def _verify_prefix(conn, keys, spans, toks, n: int) -> int:
    """How many of the first n tokens agree with a stored snapshot that holds chunk n ends at."""
    i = next(i for i, (s, ln) in enumerate(spans) if s + ln == n)
    sc, s = schema.snapshot_chunks, schema.snapshots
    row = conn.execute(
        select(s.c.tokens)
        .select_from(sc.join(s, sc.c.snapshot_id == s.c.id))
        .where(sc.c.chunk_key == keys[i], sc.c.seq == i)
        .limit(1)
    ).first()
    if row is None:
        # No snapshot lists this chunk any more (its agent was deleted, gc has not run yet): an earlier
        # chunk may still be listed by another agent's snapshot, so look again one chunk shorter.
        return spans[i][0]
    stored = tokens_to_array(tokens_from_bytes(row.tokens))[:n]
    mine = toks[:n]
    if stored.size == n and (stored == mine).all():
        return n
    diff = (stored[: min(stored.size, n)] != mine[: min(stored.size, n)]).nonzero()[0]
    return int(diff[0]) if diff.size else int(min(stored.size, n))


def restore(store: Store, tokens: Any, model: str, limit: int | None = None):
    """(cache or None, n): the longest stored prefix; see _restore_once."""
    return _reread(store, lambda: _restore_once(store, tokens, model, limit))


def _restore_once(store: Store, tokens: Any, model: str, limit: int | None = None):
    m, found = match(store, tokens, model, limit)
    if found is None:
        return None, 0
    (tree, slots), p = found
    return build_cache(store, tree, slots, p, m.n_tokens, None), m.n_tokens
