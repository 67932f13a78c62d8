"""A turn's save reads its history by whole chunks (kvstore.index.layers, issue 23 point 5): the same layer rows
and the same plan as reading every row, a presence check that still sees a lost row, and an index at any
earlier revision upgraded to the covering index it relies on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_CHUNK, downgrade_index
from sqlalchemy import create_engine, delete, inspect, update

import kvstore
from kvstore.cache import codec
from kvstore.cache.keys import chunk_keys, tokens_to_array
from kvstore.index import db, queries, schema
from kvstore.index.layers import StoredLayers, stored_layers
from kvstore.ops.pieces import plan_pieces
from kvstore.testing import KINDS, make_cache, same_cache, tokens

FP = "3c" * 16
C = TEST_CHUNK
CL = schema.chunk_layers


def _slots(cache) -> int:
    return len(codec.describe(list(cache))[1])


def _read(store, keys, slots):
    with db.transaction(store.engine, write=False, what="test") as conn:
        return stored_layers(conn, keys, slots=slots), queries.existing_layers(conn, keys)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_layers_are_the_rows_and_plan_the_same(store, kind):
    toks = tokens(5 * C + 3, seed=1)
    store.save("a", make_cache(kind, len(toks), seed=1), toks, model=FP)
    longer = toks + tokens(2 * C + 5, seed=2)  # a later turn: new chunks and a new partial tail
    cache = make_cache(kind, len(longer), seed=3)
    slots, leaves = codec.describe(list(cache))[1:]
    keys = chunk_keys(FP, longer, C) + [b"\0" * 16]  # and a key the index lacks
    have, rows = _read(store, keys, len(slots))
    assert isinstance(have, StoredLayers)
    assert dict(have) == rows and len(have) == len(rows) and set(have) == set(rows)
    for pair in [*rows, (keys[0], len(slots)), (keys[-1], 0), (keys[0], -1)]:
        assert (pair in have) == (pair in rows) and have.get(pair, -5) == rows.get(pair, -5), pair
    keys = keys[:-1]

    def plan(h):
        return [
            (p.chunk, p.slot, p.first)
            for p in plan_pieces(slots, leaves, n_tokens=len(longer), chunk_size=C, keys=keys, have=h, captured=None)
        ]

    assert plan(have) == plan(rows) and plan(have)
    store.save("a", cache, longer, model=FP)  # (its prefix's KV is the stored one: keys name a prefix)
    assert store.load("a", model=FP)[1] == longer
    assert store.fsck().ok


def test_a_turn_reads_rows_of_its_new_chunks_only(store):
    """After many turns every chunk but the new ones is whole: none of their rows come back."""
    toks = tokens(C + 3, seed=1)
    for turn in range(12):
        toks = toks + tokens(C // 2 + 1, seed=10 + turn)
        store.save("chat", make_cache("kv", len(toks), seed=turn), toks, model=FP)
    nxt = toks + tokens(C // 2 + 1, seed=99)
    keys = chunk_keys(FP, nxt, C)
    have, rows = _read(store, keys, 3)
    assert dict(have) == rows
    stored = set(chunk_keys(FP, toks, C))
    new = [i for i, k in enumerate(keys) if k not in stored]  # the chunk the turn completes, and its tail
    assert len(keys) > 8 and 1 <= len(new) <= 2
    assert have.whole == frozenset(keys) - {keys[i] for i in new} and have.rows == {}
    assert have.unfilled(keys) == new


def test_presence_check_sees_a_row_lost_from_a_whole_chunk(store):
    toks = tokens(6 * C, seed=4)
    store.save("a", make_cache("kv", len(toks), seed=4), toks, model=FP)
    keys = chunk_keys(FP, toks, C)
    with store.engine.connect() as conn:  # closed without a commit: the changes below roll back
        have = stored_layers(conn, keys, slots=3)
        assert have.whole == frozenset(keys) and queries.layers_present(conn, have)
        conn.execute(delete(CL).where(CL.c.chunk_key == keys[3], CL.c.layer == 1))
        assert not queries.layers_present(conn, have)
        # Read again: that chunk is no longer whole, its two rows come back as they are.
        again = stored_layers(conn, keys, slots=3)
        assert keys[3] not in again.whole and again.rows == {(keys[3], 0): 0, (keys[3], 2): 0}
        assert queries.layers_present(conn, again)
        # A row held from a later token is not whole either (a sliding-window layer's tail).
        conn.execute(update(CL).where(CL.c.chunk_key == keys[4], CL.c.layer == 2).values(first=5))
        third = stored_layers(conn, keys, slots=3)
        assert keys[4] not in third.whole and third[(keys[4], 2)] == 5
        assert dict(third) == queries.existing_layers(conn, keys)


def _indexes(conn) -> dict[str, list]:
    return {t: sorted((i["name"], tuple(i["column_names"])) for i in inspect(conn).get_indexes(t)) for t in
            schema.metadata.tables}  # fmt: skip


def test_migrations_build_the_indexes_create_all_does(tmp_path):
    from alembic import command

    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        command.upgrade(db._alembic_config(conn), "head")
        conn.commit()
        migrated = _indexes(conn)
    with kvstore.open(tmp_path / "s") as store, store.engine.connect() as conn:
        created = _indexes(conn)
    assert migrated == created
    assert ("ix_chunk_layers_first", ("chunk_key", "layer", "first")) in created["chunk_layers"]


def test_an_index_at_0002_is_upgraded_and_keeps_its_agents(tmp_path):
    toks = tokens(4 * C + 2, seed=5)
    cache = make_cache("kv", len(toks), seed=5)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        store.save("a", cache, toks, model=FP)
        downgrade_index(store, "0002")  # as an older kvstore left it
    with kvstore.open(tmp_path / "s") as store:
        assert store.schema_revision == schema.SCHEMA_REVISION
        with store.engine.connect() as conn:
            assert ("ix_chunk_layers_first", ("chunk_key", "layer", "first")) in _indexes(conn)["chunk_layers"]
        loaded, got = store.load("a", model=FP)
        assert got == toks and same_cache(cache, loaded)
        more = toks + tokens(C, seed=6)
        store.save("a", make_cache("kv", len(more), seed=6), more, model=FP)
        assert store.fsck().ok


def _outcome(fn, arg):
    try:
        got = fn(arg)
        return ("ok", got.dtype.str, got.tolist())
    except Exception as e:  # noqa: BLE001 (the outcome compared is the exception itself)
        return (type(e).__name__, str(e))


@pytest.mark.parametrize(
    "toks",
    [[1, 2, 3], [True, False], [1, True], [1.0, 2], [1, 2.5], [-1, 2], [2**32], [2**32 - 1], [2**70], [], ["a"],
     [np.int64(3), 4], [np.uint32(3)], [[1, 2]], [[1, 2], [3, 4]], [1, None], list(range(100_000))],
)  # fmt: skip
def test_a_token_list_converts_as_numpy_converts_it(toks):
    """Lists take array.array's path (a turn's save converts the whole history); a tuple takes numpy's."""
    assert _outcome(tokens_to_array, toks) == _outcome(tokens_to_array, tuple(toks))


@pytest.mark.parametrize("turns", [64, 512])
def test_every_reported_turn_is_the_median_of_as_many_pairs(turns):
    """bench_growth's last reported turn is the run's last: its median takes the turns up to it, as many as
    any other turn's (centred) median takes, not the half of a centred window that the run reached."""
    from benchmarks import bench_growth as bg

    width = 2 * bg.WINDOW + 1
    for t in [t for t in bg.REPORTED_TURNS if t <= turns] + [turns]:
        start = bg._window_start(t, turns)
        assert start >= 1 and start + width - 1 <= turns
        assert start <= t <= start + width - 1
        assert t != turns or start + width - 1 == turns
