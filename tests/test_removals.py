"""The removals token (kvstore.index.removals): every removal of layer rows changes it, a turn's save looks up
only the chunks it has not found whole under the current token, and a removal anywhere (another Store, a gc
between a save's plan and its commit) makes the save look again (issue 23, point 5)."""

from __future__ import annotations

import re

import mlx.core as mx
from conftest import TEST_CHUNK, downgrade_index, make_store
from sqlalchemy import event

import kvstore
from kvstore.cache.keys import chunk_keys
from kvstore.formats import SCHEMA_REVISION
from kvstore.index import db, removals
from kvstore.ops import save as save_op
from kvstore.testing import extend, make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "5e" * 16
KEY_LITERAL = re.compile(r"x'([0-9a-f]{32})'", re.IGNORECASE)


def _token(store) -> str | None:
    with db.transaction(store.engine, write=False, what="test") as conn:
        return removals.token(conn)


def _chat(store, name: str, turns: int, seed: int = 0, cache: list | None = None) -> list[int]:
    """`turns` turns of one agent, its cache growing in place (`cache`, if given)."""
    toks = tokens(C + 3, seed=seed)
    cache = make_cache("kv", len(toks), seed=seed) if cache is None else cache  # (a given one holds C + 3)
    for turn in range(turns):
        more = tokens(C // 2 + 1, seed=seed + 10 + turn)
        toks = toks + more
        extend(cache, len(more), seed=seed + 10 + turn)
        store.save(name, cache, toks, model=FP)
    return toks


def test_a_fresh_index_has_a_token_and_saves_leave_it(store):
    first = _token(store)
    assert first is not None and len(first) == 32
    _chat(store, "a", 3)
    store.delete("a")  # an agent's rows go; its chunks and their layer rows stay until a gc
    assert _token(store) == first


def test_every_removal_of_layer_rows_changes_the_token(store):
    _chat(store, "a", 4)
    toks = _chat(store, "b", 2, seed=50)
    before = _token(store)
    assert store.gc(grace=0, keep_last=100).chunks_removed == 0  # every snapshot kept: nothing removed
    assert _token(store) == before

    store.delete("a")
    assert store.gc(grace=0).chunks_removed > 0
    after_gc = _token(store)
    assert after_gc != before

    with db.transaction(store.engine, write=False, what="test") as conn:
        blob = conn.exec_driver_sql("SELECT blob_id FROM chunk_layers LIMIT 1").scalar()
    assert store.discard_blob(blob) > 0
    after_discard = _token(store)
    assert after_discard != after_gc

    # fsck --repair drops the rows of a blob whose file is damaged.
    store.save("b", make_cache("kv", len(toks), seed=99), toks, model=FP)  # the discarded KV written again
    with db.transaction(store.engine, write=False, what="test") as conn:
        blob = conn.exec_driver_sql("SELECT blob_id FROM chunk_layers LIMIT 1").scalar()
    store.blobs.path(blob).write_bytes(b"not a blob")
    assert not store.fsck().ok
    assert _token(store) == after_discard  # checking removes nothing
    store.fsck(repair=True)
    assert _token(store) != after_discard


def _looked_up(statements: list[str]) -> set[str]:
    """The chunk keys that the SELECTs among `statements` name."""
    return {k.lower() for s in statements if s.lstrip().upper().startswith("SELECT") for k in KEY_LITERAL.findall(s)}


def test_a_turns_save_looks_up_only_its_new_chunks(tmp_path):
    """Late in a chat, a save asks the index about the chunks the turn adds (and the parent of the first),
    not about its whole history: the count of keys looked up stays the same however long the chat is."""
    store = make_store(tmp_path)
    try:
        cache = make_cache("kv", C + 3, seed=0)
        toks = _chat(store, "chat", 20, cache=cache)
        statements: list[str] = []
        store.engine.dispose()  # new connections, each tracing its statements (SQLite expands the parameters)
        event.listen(store.engine, "connect", lambda dbapi, _rec: dbapi.set_trace_callback(statements.append))
        store.save("chat", cache, toks, model=FP)  # the same turn again (a connection of the new pool)
        statements.clear()
        nxt = toks + tokens(C // 2 + 1, seed=99)
        extend(cache, C // 2 + 1, seed=99)
        store.save("chat", cache, nxt, model=FP)
        keys = chunk_keys(FP, nxt, C)
        old = set(chunk_keys(FP, toks, C))
        new = [i for i, k in enumerate(keys) if k not in old]
        assert len(keys) > 10 and 1 <= len(new) <= 2
        allowed = {keys[i].hex() for i in new} | {keys[new[0] - 1].hex()}
        asked = _looked_up(statements)
        assert asked and asked <= allowed, f"looked up {len(asked)} of {len(keys)} chunk keys"
        loaded, got = store.load("chat", model=FP)
        assert got == nxt and same_cache(cache, loaded)
    finally:
        store.close()


def test_a_gc_by_another_store_makes_a_save_write_the_chunks_again(tmp_path, backend):
    """One Store learns a chat's chunks are whole; another (another process, as far as the index can tell)
    deletes the agent and collects its chunks. The first Store's next save of the same tokens must not
    trust what it learned: it writes every chunk again."""
    ours, theirs = make_store(tmp_path, backend), make_store(tmp_path, backend)
    try:
        toks = _chat(ours, "a", 6)
        theirs.delete("a")
        assert theirs.gc(grace=0).chunks_removed > 0
        cache = make_cache("kv", len(toks), mx.float16, seed=7)
        snap = ours.save("b", cache, toks, model=FP)
        assert snap.blobs_reused == 0 and snap.blobs_written > 0
        loaded, got = ours.load("b", model=FP)
        assert got == toks and same_cache(cache, loaded)
        assert ours.fsck().ok
    finally:
        theirs.close()
        ours.close()


def test_a_gc_between_a_saves_plan_and_its_commit_makes_it_plan_again(tmp_path, monkeypatch):
    """The commit skips its re-check only under the token the plan was made under: a gc in between
    changes it, the commit finds the reused rows gone, and the save plans and writes again."""
    store = make_store(tmp_path)
    try:
        toks = _chat(store, "a", 5)
        cache = make_cache("kv", len(toks), mx.float16, seed=8)
        real, calls = save_op._commit, []

        def gc_in_between(*args, **kwargs):
            if not calls:
                store.delete("a")
                assert store.gc(grace=0).chunks_removed > 0
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(save_op, "_commit", gc_in_between)
        snap = store.save("b", cache, toks, model=FP)
        assert len(calls) == 2  # planned twice
        assert snap.blobs_reused == 0
        loaded, got = store.load("b", model=FP)
        assert got == toks and same_cache(cache, loaded)
        assert store.fsck().ok
    finally:
        store.close()


def test_an_index_upgraded_to_0004_gets_a_token(tmp_path):
    toks = tokens(3 * C, seed=5)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        store.save("a", make_cache("kv", len(toks), seed=5), toks, model=FP)
        downgrade_index(store, "0003")
        assert _token(store) is None
    with kvstore.open(tmp_path / "s") as store:
        assert store.schema_revision == SCHEMA_REVISION and _token(store) is not None
        assert store.load("a", model=FP)[1] == toks
        assert store.stats().agents == 1
