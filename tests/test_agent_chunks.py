"""agent_chunks (revision 0005): which agents' snapshots list each chunk, in place of an index of the chunk
lists by chunk. A turn's save late in a chat writes as many index pages as one early in it (issue 23, point
5); every writer keeps the table equal to what the chunk lists say; fsck finds and repairs a difference;
an index at 0004 is upgraded with the table filled."""

from __future__ import annotations

import os

from conftest import TEST_CHUNK, downgrade_index, make_store
from sqlalchemy import event, inspect, text

import kvstore
from kvstore.formats import SCHEMA_REVISION
from kvstore.testing import extend, make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "3c" * 16


def listed_by_agent(store) -> set[tuple[bytes, int]]:
    """(chunk key, agent id) of every chunk some snapshot of the agent lists: what agent_chunks must hold."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT DISTINCT sc.chunk_key, s.agent_id FROM snapshot_chunks sc "
                "JOIN snapshots s ON s.id = sc.snapshot_id"
            )
        )
        return {(bytes(k), a) for k, a in rows}


def agent_chunks(store) -> set[tuple[bytes, int]]:
    with store.engine.connect() as conn:
        return {(bytes(k), a) for k, a in conn.execute(text("SELECT chunk_key, agent_id FROM agent_chunks"))}


def assert_kept(store) -> None:
    assert agent_chunks(store) == listed_by_agent(store)


def _wal_frames(path) -> int:
    """Frames in the index's WAL so far (no checkpoint runs: see the test)."""
    wal = path / "index.db-wal"
    size = wal.stat().st_size if wal.exists() else 0
    return max(0, (size - 32) // (4096 + 24))


def test_a_turns_save_writes_as_many_index_pages_late_in_a_chat_as_early(tmp_path):
    """The WAL frames a turn's commit writes, at turns 5-9, 96-100 and 146-150 of a chat of one chunk a
    turn: they may grow only with the save's own rows (its token list and its chunk list)."""
    path = tmp_path / "s"
    store = kvstore.open(path, chunk_size=C)
    # No checkpoint, so the WAL only grows and its size counts the frames each commit wrote.
    event.listen(store.engine, "connect", lambda dbapi, _rec: dbapi.execute("PRAGMA wal_autocheckpoint = 0"))
    store.engine.dispose()
    try:
        cache = make_cache("kv", C, seed=1)
        toks = tokens(C, seed=1)
        frames = {}
        for turn in range(1, 151):
            extend(cache, C, seed=100 + turn)
            toks = toks + tokens(C, seed=1000 + turn)
            before = _wal_frames(path)
            store.save("talker", cache, toks, model=FP)
            frames[turn] = _wal_frames(path) - before
        early, mid, late = (sorted(frames[t] for t in range(end - 4, end + 1))[2] for end in (9, 100, 150))
        # Before 0005 (16, 62 and 99 frames): the index by chunk took a page for each chunk of the history.
        # Now only the save's own rows grow: turn 150's 9.7 KB of token ids (3 overflow pages) and its 151
        # chunk-list rows (2-3 pages of the table and its key, a split touching the parent too).
        assert late <= early + 12 and late <= mid + 4, (early, mid, late)
        assert_kept(store)
    finally:
        store.close()


def test_every_writer_keeps_agent_chunks_equal_to_the_chunk_lists(tmp_path, backend):
    store = make_store(tmp_path, backend, chunk_size=C)
    with store:
        shared = tokens(3 * C, seed=2)
        for i, name in enumerate(("a", "b")):
            for turn in range(3):
                toks = shared + tokens(C * (turn + 1) + i, seed=10 * i + turn)
                store.save(name, make_cache("kv", len(toks), seed=10 * i + turn), toks, model=FP)
        assert_kept(store)
        store.fork("a", "a2")
        assert_kept(store)
        # A save that does not extend the head (a rewritten history) lists other chunks.
        other = tokens(2 * C + 3, seed=99)
        store.save("a2", make_cache("kv", len(other), seed=99), other, model=FP)
        assert_kept(store)
        # One that goes back to a shorter prefix of the head, and one that ends inside the head's last chunk:
        # neither is answered by the head's last two keys (the whole list is compared).
        back = shared + tokens(C + 1, seed=10)[:5]
        store.save("b", make_cache("kv", len(back), seed=7), back, model=FP)
        back2 = back[: 2 * C + 7]
        store.save("b", make_cache("kv", len(back2), seed=8), back2, model=FP)
        assert_kept(store)
        assert store.fsck().ok  # every chunk list is the one its token ids derive
        store.delete("b")
        assert_kept(store)
        report = store.gc(keep_last=1, grace=0)
        assert report.snapshots_removed > 0
        assert_kept(store)
        # What the pruned snapshots alone listed went with them, and the heads still load.
        for name in ("a", "a2"):
            assert store.load(name, model=FP)[1]
        assert store.fsck().ok


def test_archive_import_keeps_agent_chunks(tmp_path):
    with kvstore.open(tmp_path / "src", chunk_size=C) as src, kvstore.open(tmp_path / "dst", chunk_size=C) as dst:
        for turn in range(3):
            toks = tokens(C * (turn + 2), seed=turn)
            src.save("a", make_cache("kv", len(toks), seed=turn), toks, model=FP)
        kvstore.export_agent(src, "a", tmp_path / "a.tar")
        kvstore.import_agent(dst, tmp_path / "a.tar", name="untrusted")  # into a namespace of its own
        kvstore.import_agent(dst, tmp_path / "a.tar", trust=True)
        assert_kept(dst)
        assert {k for k, _ in agent_chunks(dst)} >= {k for k, _ in listed_by_agent(src)}


def test_fsck_finds_and_repairs_agent_chunks_that_differ_from_the_lists(tmp_path, backend):
    store = make_store(tmp_path, backend, chunk_size=C)
    with store:
        toks = tokens(4 * C + 5, seed=3)
        cache = make_cache("kv", len(toks), seed=3)
        store.save("a", cache, toks, model=FP)
        store.save("b", make_cache("kv", 2 * C, seed=4), tokens(2 * C, seed=4), model=FP)
        b_id = store.agent("b").head
        with store.engine.begin() as conn:
            aid = conn.execute(text("SELECT id FROM agents WHERE name = 'a'")).scalar_one()
            bid = conn.execute(text("SELECT agent_id FROM snapshots WHERE id = :s"), {"s": b_id}).scalar_one()
            key = conn.execute(
                text("SELECT chunk_key FROM agent_chunks WHERE agent_id = :a LIMIT 1"), {"a": aid}
            ).scalar_one()
            conn.execute(text("DELETE FROM agent_chunks WHERE agent_id = :a AND chunk_key = :k"), {"a": aid, "k": key})
            conn.execute(text("INSERT INTO agent_chunks (chunk_key, agent_id) VALUES (:k, :b)"), {"k": key, "b": bid})
        report = store.fsck()
        kinds = sorted((p.kind, p.subject) for p in report.problems)
        assert kinds == [("chunk_owners", "agent a"), ("chunk_owners", "agent b")], report.problems
        assert any("lacks 1 chunk" in p.detail for p in report.problems)
        assert any("records 1 chunk" in p.detail for p in report.problems)
        repaired = store.fsck(repair=True)
        assert all(p.repaired for p in repaired.problems)
        assert_kept(store)
        assert store.fsck().ok
        store.gc(grace=0)
        loaded, got = store.load("a", model=FP)
        assert got == toks and same_cache(cache, loaded)


def _shape(store) -> tuple[bool, set[str], set[str]]:
    """(whether agent_chunks exists, the indexes of snapshot_chunks, the tables its foreign keys name)."""
    with store.engine.connect() as conn:
        look = inspect(conn)
        return (
            look.has_table("agent_chunks"),
            {i["name"] for i in look.get_indexes("snapshot_chunks")},
            {f["referred_table"] for f in look.get_foreign_keys("snapshot_chunks")},
        )


def test_an_index_at_0004_is_upgraded_with_agent_chunks_filled(tmp_path, backend):
    shared = tokens(2 * C, seed=5)
    store = make_store(tmp_path, backend, chunk_size=C)
    with store:
        fresh = _shape(store)
        for i in range(3):
            toks = shared + tokens(C + i, seed=i)
            store.save(f"a{i}", make_cache("kv", len(toks), seed=i), toks, model=FP)
        expected = listed_by_agent(store)
        downgrade_index(store, "0004")
        assert _shape(store) == (False, {"ix_snapshot_chunks_chunk"}, {"snapshots", "chunks"})
        assert listed_by_agent(store) == expected  # the rows survive the way back too
    with make_store(tmp_path, backend) as store:  # the same index, opened again: upgraded
        assert store.schema_revision == SCHEMA_REVISION
        assert _shape(store) == fresh == (True, set(), {"snapshots"})
        assert agent_chunks(store) == expected
        assert store.match(shared + tokens(C + 1, seed=1), model=FP).n_tokens == 3 * C + 1
        assert store.gc(grace=0).chunks_removed == 0
        assert store.fsck().ok


def test_a_match_verifies_against_the_newest_snapshot_of_an_agent_listing_the_chunk(tmp_path):
    """The token check of a match finds a snapshot through agent_chunks: one of an agent whose first
    snapshots do not list the chunk (it came later in the chat) is still found."""
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        toks = tokens(C, seed=7)
        cache = make_cache("kv", C, seed=7)
        for turn in range(6):
            store.save("a", cache, toks, model=FP)
            extend(cache, C, seed=50 + turn)
            toks = toks + tokens(C, seed=70 + turn)
        assert store.match(toks[: 6 * C] + [1, 2, 3], model=FP).n_tokens == 6 * C
        assert os.path.exists(tmp_path / "s" / "index.db")


def test_a_turn_on_a_damaged_chunk_list_writes_its_own(tmp_path):
    """A turn copies the part of its chunk list it shares with the head inside the database, but only
    after comparing the head's whole list with its own keys: a head whose list lost a row in the middle
    does not pass the damage on, and the new snapshot loads."""
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        toks = tokens(4 * C, seed=8)
        cache = make_cache("kv", len(toks), seed=8)
        store.save("a", cache, toks, model=FP)
        head = store.agent("a").head
        with store.engine.begin() as conn:
            conn.execute(text("DELETE FROM snapshot_chunks WHERE snapshot_id = :s AND seq = 1"), {"s": head})
        extend(cache, C, seed=9)
        toks = toks + tokens(C, seed=9)
        store.save("a", cache, toks, model=FP)
        loaded, got = store.load("a", model=FP)
        assert got == toks and same_cache(cache, loaded)
