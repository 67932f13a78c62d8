"""The read path: find the longest stored prefix, read and check its blobs, build mlx-lm caches."""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from kvstore.blob import tensorfile
from kvstore.blob.backend import BlobBackend
from kvstore.blob.iopool import IoPool
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
)
from kvstore.index import db, queries
from kvstore.index import reads_restore as reads
from kvstore.index.reads_restore import head_snapshot
from kvstore.index.rows import SnapshotRow
from kvstore.ops.parts import Reader
from kvstore.ops.plan import (
    Chain,
    Found,
    Plan,
    agreeing,
    extend_by_tail,
    last_chunk,
    longest,
    plan,
    tail_parents,
    verified_tails,
)
from kvstore.records import Match

__all__ = ["Head", "head", "head_snapshot", "load", "match", "restore", "build_cache", "tokens_from_bytes"]


def _parse_layout(text, model: str):
    try:
        return codec.layout_from_json(db.parse_json(text, f"model {model}'s cache layout"))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
        raise IndexDatabaseError(
            f"the index holds a damaged cache layout for model {model}; restore index.db from a backup"
        ) from e


def build_cache(*, blobs: BlobBackend, io: IoPool, slots, tree, plan: Plan, agent: str | None) -> list:
    """The cache rebuilt from its blobs: positional layers scatter-read, state layers decoded."""
    n_tokens = plan.n_tokens
    starts = {s: codec.window_start(slot, n_tokens) if slot.kind == "rot" else 0 for s, slot in enumerate(slots)}
    spans = {s: (o, n_tokens - o) for s, o in starts.items()}
    # A remote store fetches what its disk tier lacks first; the reader then hashes what it reads there.
    where = blobs.local_paths(plan.blob_ids(), agent)
    rd = ScatterReader(
        where, spans, agent, io, windowed=frozenset(s for s, slot in enumerate(slots) if slot.kind == "rot")
    )
    for s, (slot, reads_) in enumerate(zip(slots, plan.reads)):
        if slot.kind != "state":
            for blob_id, first, start in reads_:
                rd.add(blob_id, s, start + first)
    arrays = rd.run()
    leaves = []
    for s, (slot, reads_) in enumerate(zip(slots, plan.reads)):
        if slot.kind == "state":
            pieces, state_meta = [], None
            for blob_id, _first, _start in reads_:
                got, state_meta = tensorfile.decode(blobs.read(blob_id, agent), blob_id)
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


class Head(NamedTuple):
    """What an agent's head snapshot says of it: enough to bring the agent back without its cache."""

    model: str  # the model it belongs to (an unverified import's real model, not its namespace)
    meta: dict  # the agent's metadata (the agent manager's record: kvstore.records.AgentRecord parses it)
    tokens: list[int]  # the head snapshot's exact token ids


def head(store: Reader, name: str) -> Head:
    """The model, metadata and tokens of an agent's head snapshot, in one query.

    The agent manager's `get` on resume: store.agent() also counts snapshots (a grouped scan).
    """
    with db.transaction(store.engine, write=False, what=f"reading agent {name!r}") as conn:
        row = head_snapshot(conn, name)
        # an agent imported without trust lives in its archive's namespace; its owner is the real model
        model = queries.namespace_model(conn, row.fingerprint) or row.fingerprint
    return Head(model, db.parse_json(row.meta, f"agent {name!r}'s metadata"), _snapshot_tokens(row, name))


def _snapshot_tokens(row: SnapshotRow, name: str) -> list[int]:
    """A head_snapshot row's token ids, checked against the count it records."""
    tokens = tokens_from_bytes(row.tokens)
    if len(tokens) != row.n_tokens:
        raise TokenMismatchError(
            f"agent {name!r}: snapshot {row.id} records {row.n_tokens} tokens but stores {len(tokens)} token ids"
        )
    return tokens


READ_ATTEMPTS = 5


def _reread(store: Reader, read):
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
                named = reads.blob_named(conn, e.blob_id)
            if named and not store.blobs.exists(e.blob_id):
                raise


def load(store: Reader, name: str, model: str | None, snapshot_id: int | None):
    """(cache, tokens) of a snapshot; see _load_once."""
    return _reread(store, lambda: _load_once(store, name, model, snapshot_id))


def _load_once(store: Reader, name: str, model: str | None, snapshot_id: int | None):
    with db.transaction(store.engine, write=False, what=f"loading agent {name!r}") as conn:
        row = head_snapshot(conn, name, snapshot_id)
        if model is not None and row.fingerprint != model and queries.namespace_model(conn, row.fingerprint) != model:
            raise ModelMismatchError(
                f"agent {name!r} was saved with model {row.fingerprint}, not {model}: its cache cannot be used"
            )
        tokens = _snapshot_tokens(row, name)
        stored, layers = reads.snapshot_layers(conn, row.id)
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
    return build_cache(blobs=store.blobs, io=store.io, slots=slots, tree=tree, plan=p, agent=name), tokens


def match(store: Reader, tokens: Any, model: str, limit: int | None = None) -> tuple[Match, Found | None]:
    """The longest stored, token-verified prefix of `tokens` (at most `limit` tokens); and its plan."""
    toks = tokens_to_array(tokens)
    if limit is not None:
        toks = toks[:limit]
    keys = chunk_keys(model, toks, store.chunk_size)
    spans = chunk_spans(int(toks.size), store.chunk_size)
    with db.transaction(store.engine, write=False, what="matching a prefix") as conn:
        text = queries.model_layout(conn, model)
        layout = None if text is None else _parse_layout(text, model)
        if layout is None or not keys:
            return Match(0, model), None
        tree, slots = layout
        layers = reads.layers(conn, keys)
        chain = Chain(keys, spans, layers, longest(slots, keys, spans, layers))
        chain = _stored_tail(conn, slots=slots, model=model, toks=toks, chain=chain, chunk_size=store.chunk_size)
        keys, spans, layers, n = chain
        while n:
            verified = _verify_prefix(conn, keys=keys, spans=spans, toks=toks, n=n)
            if verified == n:
                break
            n = longest(slots, keys, spans, layers, n_max=verified)
    if n == 0:
        return Match(0, model), None
    n_chunks = last_chunk(spans, n) + 1
    p = plan(slots, keys, spans, n, layers)
    assert p is not None  # longest() planned it
    return Match(n, model, n_chunks, tuple(keys[:n_chunks])), Found(tree, slots, p)


def _stored_tail(conn, *, slots, model: str, toks: np.ndarray, chain: Chain, chunk_size: int) -> Chain:
    """The chain extended by a stored partial chunk that the request continues, if that reaches further.

    (plan.tail_parents says which and why.)
    """
    if chain.n_tokens >= toks.size:
        return chain
    parents = tail_parents(model, chain.keys, chain.n_tokens, int(toks.size), chunk_size)
    tails = verified_tails(parents, reads.stored_tails(conn, parents, chunk_size), toks, chain.n_tokens, chunk_size)
    if not tails:
        return chain
    return extend_by_tail(slots, chain, tails, reads.layers(conn, [t.key for t in tails]))


def _verify_prefix(conn, *, keys: list[bytes], spans, toks: np.ndarray, n: int) -> int:
    """How many of the first n tokens agree with a stored snapshot that holds chunk n ends at."""
    i = last_chunk(spans, n)
    raw = reads.listed_tokens(conn, keys[i], i)
    stored = None if raw is None else np.frombuffer(raw, dtype="<u4")  # the stored form is the compared form
    return agreeing(stored, toks, spans, n)


def restore(store: Reader, tokens: Any, model: str, limit: int | None = None):
    """(cache or None, n): the longest stored prefix; see _restore_once."""
    return _reread(store, lambda: _restore_once(store, tokens, model, limit))


def _restore_once(store: Reader, tokens: Any, model: str, limit: int | None = None):
    m, found = match(store, tokens, model, limit)
    if found is None:
        return None, 0
    cache = build_cache(blobs=store.blobs, io=store.io, slots=found.slots, tree=found.tree, plan=found.plan, agent=None)
    return cache, m.n_tokens
