"""fsck finds every damaged blob and dangling reference; gc keeps what retention needs and nothing else."""

from __future__ import annotations

import os
import time

import mlx.core as mx
import pytest
from conftest import TEST_CHUNK
from sqlalchemy import text

import kvstore
from kvstore.testing import make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "ee" * 16


def save(store, name, n, seed):
    cache = make_cache("kv", n, mx.float16, layers=2, seed=seed)
    toks = tokens(n, seed=seed)
    store.save(name, cache, toks, model=FP)
    return cache, toks


def blobs_of(store, name):
    with store.engine.connect() as conn:
        return [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT cl.blob_id FROM agents a JOIN snapshot_chunks sc ON sc.snapshot_id = a.head "
                    "JOIN chunk_layers cl ON cl.chunk_key = sc.chunk_key WHERE a.name = :n ORDER BY sc.seq, cl.layer"
                ),
                {"n": name},
            )
        ][::2]  # two layers share each chunk's blob


def test_fsck_finds_each_flip_truncation_and_deletion(store):
    save(store, "a", 4 * C, seed=1)
    save(store, "b", 2 * C, seed=2)
    ids = blobs_of(store, "a")
    flipped, truncated, deleted = ids[0], ids[2], ids[3]
    originals = {b: store.blobs.path(b).read_bytes() for b in (truncated, deleted)}
    p = store.blobs.path(flipped)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    p = store.blobs.path(truncated)
    p.write_bytes(p.read_bytes()[:-7])
    store.blobs.path(deleted).unlink()
    report = store.fsck()
    assert not report.ok
    assert {(pr.kind, pr.subject) for pr in report.problems} == {
        ("corrupt_blob", flipped),
        ("corrupt_blob", truncated),
        ("missing_blob", deleted),
    }
    # Loading the damaged agent names the blob and the agent; the other agent is unaffected.
    with pytest.raises(kvstore.BlobError) as err:
        store.load("a", model=FP)
    assert err.value.agent == "a" and err.value.blob_id in {flipped, truncated, deleted}
    store.load("b", model=FP)
    # With the truncated and deleted blobs put back, the load must still catch the one flipped byte.
    for b, data in originals.items():
        store.blobs.path(b).write_bytes(data)
    with pytest.raises(kvstore.CorruptBlobError) as err:
        store.load("a", model=FP)
    assert (err.value.agent, err.value.blob_id) == ("a", flipped)
    assert {(pr.kind, pr.subject) for pr in store.fsck().problems} == {("corrupt_blob", flipped)}
    store.blobs.path(truncated).write_bytes(originals[truncated][:-7])  # damaged again for the repair below
    store.blobs.path(deleted).unlink()
    repaired = store.fsck(repair=True)
    assert repaired.repaired and len([p for p in repaired.problems if p.kind != "prefix_shortened"]) == 3
    assert {p.subject.split(" snapshot")[0] for p in repaired.problems if p.kind == "prefix_shortened"} == {"agent a"}
    assert set(repaired.needs_recompute) == {s.id for s in store.snapshots("a")}
    assert store.fsck().ok
    # The agent's record (its tokens) survives the repair; only the KV must be recomputed.
    assert store.agent("a").n_tokens == 4 * C


def test_fsck_finds_every_flipped_byte_of_a_blob(store):
    save(store, "a", C, seed=3)
    blob = blobs_of(store, "a")[0]
    path = store.blobs.path(blob)
    original = path.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 64)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x80
        path.write_bytes(bytes(damaged))
        assert [(p.kind, p.subject) for p in store.fsck().problems] == [("corrupt_blob", blob)], offset
    path.write_bytes(original)
    assert store.fsck().ok


def test_fsck_finds_dangling_references(store, backend):
    save(store, "a", 3 * C, seed=4)
    save(store, "b", 2 * C, seed=5)
    with store.engine.begin() as conn:
        if backend == "sqlite":
            conn.execute(text("PRAGMA foreign_keys = OFF"))
        # A snapshot whose token ids no longer derive its chunks, and an agent head that points nowhere.
        conn.execute(
            text("UPDATE snapshots SET tokens = :t WHERE id = (SELECT head FROM agents WHERE name = 'b')"),
            {"t": bytes(4 * 2 * C)},
        )
        conn.execute(text("UPDATE agents SET head = 9999 WHERE name = 'a'"))
    kinds = sorted((p.kind, p.subject) for p in store.fsck().problems)
    assert kinds == [("dangling_ref", "agent a"), ("token_mismatch", f"snapshot {store.snapshots('b')[0].id}")]
    with pytest.raises(kvstore.TokenMismatchError):
        store.load("b", model=FP)
    store.fsck(repair=True)
    assert store.fsck().ok
    store.load("a", model=FP)


def test_gc_keeps_retained_snapshots_and_removes_the_rest(store):
    cache1, toks1 = save(store, "a", 2 * C, seed=6)
    cache2, toks2 = save(store, "a", 3 * C, seed=7)
    cache3, toks3 = save(store, "a", 3 * C + 2, seed=8)
    save(store, "gone", 2 * C, seed=9)
    store.delete("gone")
    before = {b for b, _ in store.blobs.iter_files()}
    dry = store.gc(dry_run=True, keep_last=2, grace=0)
    assert {b for b, _ in store.blobs.iter_files()} == before
    report = store.gc(keep_last=2, grace=0)
    assert (dry.snapshots_removed, dry.blobs_removed, dry.bytes_freed) == (
        report.snapshots_removed,
        report.blobs_removed,
        report.bytes_freed,
    )
    assert report.snapshots_removed == 1
    assert [s.n_tokens for s in store.snapshots("a")] == [3 * C, 3 * C + 2]
    loaded, got = store.load("a", model=FP)
    assert got == toks3 and same_cache(cache3, loaded)
    loaded, got = store.load("a", model=FP, snapshot=store.snapshots("a")[0].id)
    assert got == toks2 and same_cache(cache2, loaded)
    # Every file left is needed by a retained snapshot, and every unneeded one is gone.
    needed = set()
    for snap in store.snapshots("a"):
        with store.engine.connect() as conn:
            needed |= {
                r[0]
                for r in conn.execute(
                    text(
                        "SELECT cl.blob_id FROM snapshot_chunks sc JOIN chunk_layers cl ON cl.chunk_key = sc.chunk_key "
                        "WHERE sc.snapshot_id = :s"
                    ),
                    {"s": snap.id},
                )
            }
    assert {b for b, _ in store.blobs.iter_files()} == needed
    assert store.fsck().ok


def test_gc_grace_period_spares_young_orphans(store):
    save(store, "a", C, seed=10)
    orphan_id, _, written = store.blobs.put([b"not referenced by any row"])
    assert written
    (store.blobs.tmp_dir / "left-by-a-crash.tmp").write_bytes(b"partial")
    assert store.gc(grace=3600).files_removed == 0
    assert store.blobs.path(orphan_id).exists()
    old = time.time() - 7200
    os.utime(store.blobs.path(orphan_id), (old, old))
    os.utime(store.blobs.tmp_dir / "left-by-a-crash.tmp", (old, old))
    report = store.gc(grace=3600)
    assert (report.files_removed, report.temp_removed) == (1, 1)
    assert not store.blobs.path(orphan_id).exists()
    assert list(store.blobs.iter_temp()) == []
    assert store.fsck().ok


def test_one_gc_at_a_time(store):
    from kvstore.ops.gc import gc_lock

    with gc_lock(store):
        with pytest.raises(kvstore.StoreLockedError, match="another gc"):
            store.gc()
    store.gc()


def test_gc_of_named_agents_leaves_every_other_agents_snapshots(store):
    """gc(agents=...) applies retention to those agents only (the server's disk budget trims its own
    conversations, never the snapshots of a store's other agents)."""
    for n, seed in ((2 * C, 10), (3 * C, 11)):
        save(store, "mine", n, seed=seed)
        save(store, "theirs", n, seed=seed + 10)
    dry = store.gc(dry_run=True, keep_last=1, grace=0, agents=["mine", "not-an-agent"])
    report = store.gc(keep_last=1, grace=0, agents=["mine", "not-an-agent"])
    assert dry.snapshots_removed == report.snapshots_removed == 1
    assert [s.n_tokens for s in store.snapshots("mine")] == [3 * C]
    assert [s.n_tokens for s in store.snapshots("theirs")] == [2 * C, 3 * C]
    assert store.gc(keep_last=1, grace=0, agents=[]).snapshots_removed == 0
    assert store.gc(keep_last=1, grace=0).snapshots_removed == 1  # without agents: every agent
    assert store.fsck().ok


def test_keep_last_must_be_positive(store):
    with pytest.raises(ValueError, match="keep_last"):
        store.gc(keep_last=0)


def _stock_sqlite_limit(store):
    """Give the store's SQLite connections the parameter limit of SQLite builds before 3.32 (999): what a
    statement binding one parameter per row meets, at a smaller count, in any SQLite (32,766) or in
    PostgreSQL (65,535)."""
    import sqlite3

    from sqlalchemy import event

    if not hasattr(sqlite3.Connection, "setlimit"):
        pytest.skip("sqlite3's setlimit needs Python 3.11")

    @event.listens_for(store.engine, "connect")
    def _limit(dbapi_conn, _record):
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    store.engine.dispose()


def _older_copies(store, snapshot_id: int, n: int) -> None:
    """n more snapshots of the same agent, older than all, copies of `snapshot_id` with its chunk list."""
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :k) "
                "INSERT INTO snapshots (id, agent_id, model_id, n_tokens, tokens, created, label, pinned) "
                "SELECT -i, agent_id, model_id, n_tokens, tokens, created - i, NULL, 0 "
                "FROM snapshots, n WHERE snapshots.id = :old"
            ),
            {"k": n, "old": snapshot_id},
        )
        conn.execute(
            text(
                "INSERT INTO snapshot_chunks (snapshot_id, seq, chunk_key) SELECT s.id, sc.seq, sc.chunk_key "
                "FROM snapshots s JOIN snapshot_chunks sc ON sc.snapshot_id = :old WHERE s.id < 0"
            ),
            {"old": snapshot_id},
        )


def test_gc_dry_run_counts_more_prunable_snapshots_than_a_statement_may_bind(tmp_path):
    """A dry run over more prunable snapshots than one statement may bind reports what gc then removes;
    it bound every snapshot id in one `IN (...)` and failed with "too many SQL variables"."""
    n_old = 1_200
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        save(store, "talker", 3 * C, seed=1)
        save(store, "talker", 4 * C, seed=1)  # its head; the snapshot before it is kept by keep_last=2
        first = store.snapshots("talker")[0].id
        _older_copies(store, first, n_old)
        _stock_sqlite_limit(store)
        dry = store.gc(dry_run=True, keep_last=2, grace=0)
        assert dry.snapshots_removed == n_old
        real = store.gc(keep_last=2, grace=0)
        assert (real.snapshots_removed, real.chunks_removed, real.blobs_removed) == (
            dry.snapshots_removed,
            dry.chunks_removed,
            dry.blobs_removed,
        )
        assert [s.n_tokens for s in store.snapshots("talker")] == [3 * C, 4 * C]


def test_an_agent_with_more_snapshots_than_a_statement_may_bind_exports(tmp_path):
    """An export read the chunk lists of all the agent's snapshots by a list of their ids in one `IN (...)`."""
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        _cache, toks = save(store, "talker", 3 * C, seed=1)
        _older_copies(store, store.snapshots("talker")[0].id, 1_200)
        _stock_sqlite_limit(store)
        got = kvstore.export_agent(store, "talker", tmp_path / "talker.kvstore")
        assert got.snapshots == 1_201
    with kvstore.open(tmp_path / "t", chunk_size=C) as other:
        kvstore.import_agent(other, tmp_path / "talker.kvstore", trust=True)
        assert len(other.snapshots("talker")) == 1_201
        assert other.restore(toks, model=FP)[1] == 3 * C


def test_gc_sweeps_more_orphan_files_than_a_statement_may_bind(tmp_path):
    """gc re-checks the files it is about to remove a thousand at a time, under the write lock: the check
    bound all thousand ids in one `IN (...)`."""
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        save(store, "talker", 3 * C, seed=1)
        kept = {p.name for p in (tmp_path / "s" / "blobs").rglob("*.safetensors")}
        for i in range(1_200):
            blob_id = f"{i:032x}"
            (tmp_path / "s" / "blobs" / blob_id[:2] / (blob_id[2:] + ".safetensors")).write_bytes(b"orphan")
        _stock_sqlite_limit(store)
        got = store.gc(keep_last=1, grace=0)
        assert got.files_removed == 1_200
        assert {p.name for p in (tmp_path / "s" / "blobs").rglob("*.safetensors")} == kept
