"""Chunk sizes kept in the index (issue 4): the fast figures equal a slow recount, through every writer,
fsck finds a wrong size and repairs it, and an index at revision 0001 is upgraded with the same figures."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from byte_oracle import recount_bytes
from click.testing import CliRunner
from conftest import TEST_CHUNK, make_store
from mlx_lm.models import cache as mlc
from sqlalchemy import MetaData, create_engine, select, text

import kvstore
from kvstore.cache.capture import Capture
from kvstore.index import db
from kvstore.ops import accounting as accounting
from kvstore.testing import make_cache, tokens

C = TEST_CHUNK
FP = "5a" * 16
HYBRID = "6b" * 16
WINDOW = "7c" * 16


def assert_fast_equals_slow(store) -> None:
    per_agent, logical = recount_bytes(store)
    assert accounting.agent_bytes(store) == per_agent
    # The two-connection path that large stores take gives the same figures.
    parallel_from, accounting.PARALLEL_AGENTS = accounting.PARALLEL_AGENTS, 1
    try:
        assert accounting.agent_bytes(store) == per_agent
    finally:
        accounting.PARALLEL_AGENTS = parallel_from
    assert store.stats().logical_bytes == logical
    for name in per_agent:
        assert accounting.agent_bytes(store, name) == {name: per_agent[name]}
        assert sum(r["bytes"] for r in accounting.chunk_runs(store, name)) == per_agent[name]["total_bytes"]
    report = store.fsck()
    assert report.ok, report.problems


def rotating_with_capture(n: int, seed: int):
    """A Gemma-style cache (sliding layers around a global one) prefilled in chunk steps, with its captured pieces."""
    cache = [mlc.RotatingKVCache(max_size=24), mlc.KVCache(), mlc.RotatingKVCache(max_size=24)]
    capture = Capture(C)
    key = mx.random.key(seed)
    for start in range(0, n, C):
        step = min(C, n - start)
        for c in cache:
            key, k1, k2 = mx.random.split(key, 3)
            c.update_and_fetch(
                mx.random.normal((1, 2, step, 8), key=k1).astype(mx.float16),
                mx.random.normal((1, 2, step, 8), key=k2).astype(mx.float16),
            )
        capture.take(cache)
    return cache, capture.pieces


def build(store) -> None:
    """Shared prefixes, forks, several snapshots, and the writes that change a stored chunk's bytes."""
    prefix = tokens(3 * C, seed=1)
    for name, seed, extra in (("tech", 2, C + 5), ("biz", 3, 9), ("ops", 4, 2 * C)):
        t = prefix + tokens(extra, seed=seed)
        store.save(name, make_cache("kv", len(t), seed=seed), t, model=FP)
    store.fork("tech", "tech-2")
    t = prefix + tokens(C + 5, seed=2) + tokens(C, seed=5)  # tech grows: a new head, the old one kept
    store.save("tech", make_cache("kv", len(t), seed=6), t, model=FP)
    store.save("ops", make_cache("kv", 2 * C, seed=7), prefix[: 2 * C], model=FP)  # ops goes back to 2 chunks
    store.save("solo", make_cache("kv", C - 3, seed=8), tokens(C - 3, seed=8), model=FP)
    store.save("empty", make_cache("kv", 0, seed=9), [], model=FP)
    # Hybrid model: a state blob lands on the last chunk. "h2" ends on a chunk "h1" runs through, so
    # that stored chunk gains a layer row and every chunk after it on h1's chain grows.
    h = tokens(3 * C + 5, seed=10)
    store.save("h1", make_cache("cachelist", len(h), seed=10), h, model=HYBRID)
    store.save("h2", make_cache("cachelist", 2 * C, seed=11), h[: 2 * C], model=HYBRID)
    # Sliding-window model: "w1"'s finished cache holds only its window, so its early chunks lack the
    # sliding layers; "w2" shares the prefix and brings them (and a fuller piece) from its capture.
    w = tokens(4 * C, seed=12)
    store.save("w1", make_cache("rotating", len(w), seed=12), w, model=WINDOW)
    w2 = w + tokens(C + 3, seed=13)
    cache, pieces = rotating_with_capture(len(w2), seed=13)
    store.save("w2", cache, w2, model=WINDOW, captured=pieces)


def test_fast_figures_equal_a_slow_recount(store):
    build(store)
    assert_fast_equals_slow(store)
    shared = accounting.agent_bytes(store)
    assert shared["tech-2"]["shared_bytes"] > 0 and shared["h1"]["shared_bytes"] > 0
    assert shared["w1"]["unique_bytes"] == 0 and shared["empty"]["total_bytes"] == 0


def test_sizes_grow_down_the_chain_when_a_stored_chunk_gains_layers(store):
    w = tokens(4 * C, seed=12)
    store.save("w1", make_cache("rotating", len(w), seed=12), w, model=WINDOW)
    before = accounting.agent_bytes(store, "w1")["w1"]["total_bytes"]
    cache, pieces = rotating_with_capture(len(w) + C, seed=13)
    store.save("w2", cache, w + tokens(C, seed=13), model=WINDOW, captured=pieces)
    # w1's own head did not change, yet its chunks now hold more: the change reached its last chunk.
    assert accounting.agent_bytes(store, "w1")["w1"]["total_bytes"] > before
    assert_fast_equals_slow(store)


def test_archive_import_and_discard_keep_sizes(store, tmp_path):
    build(store)
    kvstore.export_agent(store, "tech", tmp_path / "tech.kva")
    kvstore.export_agent(store, "w2", tmp_path / "w2.kva")
    kvstore.import_agent(store, tmp_path / "tech.kva", name="tech-copy")  # every chunk deduplicated
    with kvstore.open(tmp_path / "other", chunk_size=C) as other:
        kvstore.import_agent(other, tmp_path / "tech.kva")
        kvstore.import_agent(other, tmp_path / "w2.kva")
        with other.engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM chunks WHERE parent IS NULL")).scalar() == 0
        assert_fast_equals_slow(other)
    with store.engine.connect() as conn:
        blob = conn.execute(
            text(
                "SELECT cl.blob_id FROM agents a JOIN snapshot_chunks sc ON sc.snapshot_id = a.head "
                "JOIN chunk_layers cl ON cl.chunk_key = sc.chunk_key WHERE a.name = 'biz' AND sc.seq = 1"
            )
        ).scalar()
    store.discard_blob(blob)  # a chunk in the shared prefix loses its KV
    assert_fast_equals_slow(store)


def test_fsck_reports_a_wrong_size_and_repair_fixes_it(store):
    build(store)
    with db.transaction(store.engine, write=True, what="test") as conn:
        key = conn.execute(
            text(
                "SELECT sc.chunk_key FROM agents a JOIN snapshot_chunks sc "
                "ON sc.snapshot_id = a.head WHERE a.name = 'tech' AND sc.seq = 3"
            )
        ).scalar()
        conn.execute(text("UPDATE chunks SET nbytes = nbytes + 7 WHERE key = :k"), {"k": key})
        conn.execute(
            text(
                "UPDATE chunks SET prefix_bytes = 1 WHERE seq = 0 AND model_id = "
                "(SELECT id FROM models WHERE fingerprint = :fp)"
            ),
            {"fp": HYBRID},
        )
    report = store.fsck()
    kinds = {(p.kind, p.subject.split()[0]) for p in report.problems}
    assert not report.ok and kinds == {("wrong_size", "chunk")}
    assert f"chunk {bytes(key).hex()}" in {p.subject for p in report.problems}
    repaired = store.fsck(repair=True)
    assert all(p.repaired for p in repaired.problems) and repaired.needs_recompute == ()
    assert_fast_equals_slow(store)


# -- upgrading an index at revision 0001 ---------------------------------------------------------------

TABLES = ("store_meta", "models", "blobs", "chunks", "chunk_layers", "agents", "snapshots", "snapshot_chunks")


def _index_at_0001(url: str) -> None:
    """An empty index built the way kvstore 0001 built it: Alembic up to revision 0001."""
    from alembic import command

    engine = create_engine(url)
    with engine.connect() as conn:
        command.upgrade(db._alembic_config(conn), "0001")
        conn.commit()
    engine.dispose()


def _copy_rows(src, dst_url: str, orphan_agent: str) -> None:
    """Copy every row into the 0001 index (its columns only). `orphan_agent`'s chunks lose their parent,
    as kvstore 0001's archive import left them."""
    engine = create_engine(dst_url)
    with engine.begin() as dst, src.engine.connect() as s:
        target = MetaData()
        target.reflect(dst)
        assert "nbytes" not in target.tables["chunks"].c
        for name in TABLES:
            table = target.tables[name]
            rows = [
                dict(r._mapping) for r in s.execute(select(*[text(c.name) for c in table.c]).select_from(text(name)))
            ]
            if rows:
                dst.execute(table.insert(), rows)
        dst.execute(
            text(
                "UPDATE chunks SET parent = NULL WHERE key IN (SELECT sc.chunk_key FROM snapshot_chunks sc "
                "JOIN snapshots sn ON sn.id = sc.snapshot_id JOIN agents a ON a.id = sn.agent_id WHERE a.name = :n)"
            ),
            {"n": orphan_agent},
        )
        if dst.dialect.name == "postgresql":  # ids were copied: move the sequences past them
            for name in ("models", "agents", "snapshots"):
                dst.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT MAX(id) FROM {name}))")
                )
    engine.dispose()


def _figures(store) -> dict:
    st = store.stats().as_dict()
    for k in ("path", "url", "schema_revision"):
        st.pop(k)
    names = [a.name for a in store.agents()]
    return {
        "stats": st,
        "bytes": accounting.agent_bytes(store),
        "runs": {n: accounting.chunk_runs(store, n) for n in names},
    }


def _parents(store) -> dict:
    with store.engine.connect() as conn:
        return {bytes(k): bytes(p) for k, p in conn.execute(text("SELECT key, parent FROM chunks"))}


@pytest.fixture
def old_index(tmp_path, backend):
    """(a store at head, the location of the same store's rows in an index at 0001, open kwargs)."""
    src = make_store(tmp_path / "src", backend)
    build(src)
    kvstore.export_agent(src, "tech", tmp_path / "tech.kva")
    kvstore.import_agent(src, tmp_path / "tech.kva", name="imported")
    if backend == "postgresql":
        from conftest import fresh_pg_database

        url = fresh_pg_database()
        kwargs = {"blobs": tmp_path / "old-blobs", "chunk_size": C}
        shutil.copytree(src.blobs.root, tmp_path / "old-blobs")
        location = url
    else:
        (tmp_path / "old").mkdir()
        shutil.copytree(src.blobs.blob_dir, tmp_path / "old" / "blobs")
        url = f"sqlite:///{tmp_path / 'old' / 'index.db'}"
        kwargs = {}
        location = tmp_path / "old"
    _index_at_0001(url)
    _copy_rows(src, url, orphan_agent="imported")
    yield src, location, kwargs
    src.close()


def test_open_upgrades_an_index_at_0001_to_the_same_figures(old_index):
    src, location, kwargs = old_index
    with kvstore.open(location, **kwargs) as store:
        assert store.schema_revision == kvstore.index.schema.SCHEMA_REVISION
        assert _figures(store) == _figures(src)
        assert _parents(store) == _parents(src)  # the import's chunks got their parents back
        assert_fast_equals_slow(store)
        # Writes after the upgrade keep the sizes too.
        t = tokens(3 * C, seed=1) + tokens(C + 2, seed=20)
        store.save("late", make_cache("kv", len(t), seed=20), t, model=FP)
        assert_fast_equals_slow(store)


def test_kvstore_migrate_upgrades_an_index_at_0001(old_index, backend):
    if backend != "sqlite":
        pytest.skip("the CLI test runs on a store folder")
    src, location, _ = old_index
    from kvstore.cli.main import cli

    def run(*args):
        result = CliRunner().invoke(cli, ["--store", str(location), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert run("migrate", "--status", "--json")["current"] == "0001"
    assert run("migrate", "--json") == {"from": "0001", "to": kvstore.index.schema.SCHEMA_REVISION, "upgraded": True}
    info = run("info", "--json")
    want = src.stats().as_dict()
    assert {k: info[k] for k in ("logical_bytes", "bytes_on_disk", "chunks", "agents", "dedup_ratio")} == {
        k: want[k] for k in ("logical_bytes", "bytes_on_disk", "chunks", "agents", "dedup_ratio")
    }
    got = {
        r["name"]: {k: r[k] for k in ("unique_bytes", "shared_bytes", "total_bytes")} for r in run("agents", "--json")
    }
    assert got == accounting.agent_bytes(src)
    assert run("fsck", "--json")["ok"] is True
