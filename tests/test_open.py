"""Opening stores: settings checked, schema versions, names, locks, model guard."""

from __future__ import annotations

import sqlite3

import mlx.core as mx
import pytest

import kvstore
from kvstore.testing import make_cache, tokens

FP = "34" * 16


def test_settings_are_stored_and_checked(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=32) as store:
        assert store.chunk_size == 32
    with kvstore.open(tmp_path / "s") as store:
        assert store.chunk_size == 32
    with pytest.raises(kvstore.IncompatibleStoreError, match="created with chunk size 32, not 64"):
        kvstore.open(tmp_path / "s", chunk_size=64)


def test_default_home_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_HOME", str(tmp_path / "home"))
    with kvstore.open() as store:
        assert store.path == tmp_path / "home"
        assert (tmp_path / "home" / "index.db").exists()


def test_newer_schema_is_refused_naming_both_versions(tmp_path):
    kvstore.open(tmp_path / "s").close()
    con = sqlite3.connect(tmp_path / "s" / "index.db")
    con.execute("UPDATE alembic_version SET version_num = '0099'")
    con.commit()
    con.close()
    with pytest.raises(kvstore.SchemaTooNewError) as err:
        kvstore.open(tmp_path / "s")
    assert "0099" in str(err.value) and kvstore.index.schema.SCHEMA_REVISION in str(err.value)


def test_fresh_index_is_stamped_at_head(tmp_path):
    from kvstore.index import db, schema

    with kvstore.open(tmp_path / "s") as store:
        assert db.migration_status(store.engine) == {
            "current": schema.SCHEMA_REVISION,
            "head": schema.SCHEMA_REVISION,
            "up_to_date": True,
        }


def test_old_index_is_upgraded_by_alembic(tmp_path):
    """An index created by running the migrations (not create_all) is the same schema, at head."""
    from alembic import command
    from sqlalchemy import create_engine, inspect

    from kvstore.index import db, schema

    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        command.upgrade(db._alembic_config(conn), "head")
        conn.commit()
        migrated = {t: sorted(c["name"] for c in inspect(conn).get_columns(t)) for t in schema.metadata.tables}
    with kvstore.open(tmp_path / "s") as store, store.engine.connect() as conn:
        created = {t: sorted(c["name"] for c in inspect(conn).get_columns(t)) for t in schema.metadata.tables}
    assert migrated == created


def test_not_a_store(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(kvstore.NotAStoreError, match="is a file"):
        kvstore.open(tmp_path / "file")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(kvstore.NotAStoreError, match="no index.db"):
        kvstore.open(tmp_path / "docs")
    with pytest.raises(kvstore.NotAStoreError, match="no store"):
        kvstore.open(tmp_path / "missing", create=False)


@pytest.mark.parametrize("name", ["..", "/", "a/b", "a\x00b", "x" * 10_000, "", "-rf", ".hidden", "a..b", " a"])
def test_hostile_names(store, name):
    with pytest.raises(kvstore.InvalidNameError):
        store.save(name, make_cache("kv", 3, mx.float16), tokens(3), model=FP)
    with pytest.raises(kvstore.InvalidNameError):
        store.load(name)
    assert store.agents() == []


def test_wrong_model_loads_nothing(store):
    store.save("a", make_cache("kv", 20, mx.float16), tokens(20), model=FP)
    with pytest.raises(kvstore.ModelMismatchError, match="was saved with model"):
        store.load("a", model="56" * 16)
    with pytest.raises(kvstore.ModelMismatchError, match="belongs to model"):
        store.save("a", make_cache("kv", 20, mx.float16), tokens(20), model="56" * 16)
    # A cache of another shape under the same fingerprint is another model in disguise.
    with pytest.raises(kvstore.ModelMismatchError, match="do not match"):
        store.save("b", make_cache("rotating", 20, mx.float16), tokens(20), model=FP)
    assert store.match(tokens(20), model="56" * 16).n_tokens == 0


def test_unknown_agent(store):
    with pytest.raises(kvstore.UnknownAgentError, match="no agent named 'nobody'"):
        store.load("nobody")
    assert store.delete("nobody") is False


def test_locked_past_timeout(tmp_path):
    with kvstore.open(tmp_path / "s", timeout=0.2) as store:
        holder = sqlite3.connect(tmp_path / "s" / "index.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(kvstore.StoreLockedError, match="locked"):
                store.save("a", make_cache("kv", 3, mx.float16), tokens(3), model=FP)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        store.save("a", make_cache("kv", 3, mx.float16), tokens(3), model=FP)
        assert store.fsck().ok


def test_fork_shares_every_blob(store):
    cache = make_cache("kv", 40, mx.float16)
    store.save("a", cache, tokens(40), model=FP, meta={"role": "tech"})
    files = {b for b, _ in store.blobs.iter_files()}
    store.fork("a", "b")
    assert {b for b, _ in store.blobs.iter_files()} == files
    loaded, toks = store.load("b", model=FP)
    assert toks == tokens(40) and store.agent("b").meta == {"role": "tech"}
    with pytest.raises(kvstore.AgentExistsError):
        store.fork("a", "b")
    store.delete("a")
    store.gc(grace=0)
    assert store.load("b", model=FP)[1] == tokens(40)
    assert store.fsck().ok


def _open_and_report(path: str, queue) -> None:
    try:
        with kvstore.open(path) as store:
            queue.put(("ok", store.schema_revision))
    except Exception as e:  # noqa: BLE001 - the parent reports what went wrong
        queue.put(("error", f"{type(e).__name__}: {e}"))


def test_processes_opening_an_old_index_at_once_upgrade_it_once(tmp_path):
    """Four processes open a store whose index is at the first revision: one upgrades, the others
    wait for its lock and find the index at head (no migration replayed, no error)."""
    import multiprocessing

    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from kvstore.index import db, schema

    root = tmp_path / "s"
    with kvstore.open(root) as store:  # a real store (settings, folders), then its index rebuilt at the oldest revision
        pass
    (root / "index.db").unlink()
    engine = create_engine(f"sqlite:///{root / 'index.db'}")
    with engine.connect() as conn:
        cfg = db._alembic_config(conn)
        oldest = list(ScriptDirectory.from_config(cfg).walk_revisions())[-1].revision
        command.upgrade(cfg, oldest)
        conn.commit()
    engine.dispose()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_and_report, args=(str(root), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [("ok", schema.SCHEMA_REVISION)] * 4
    with kvstore.open(root) as store:
        assert db.migration_status(store.engine)["up_to_date"]
