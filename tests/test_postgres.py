"""PostgreSQL-only behaviour: processes sharing one index, the advisory locks, Alembic, connection errors.

The engine suite already runs on PostgreSQL through the `store` fixture; these are the properties only
a server-backed index has. They need KVSTORE_TEST_PG_URL (`.ci/run` starts a throwaway server).

Run as a script, this file is the child process of the multi-process tests (`python test_postgres.py
ROLE ...`), so the child shares the test's code instead of a copy of it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kvstore

PG_URL = os.environ.get("KVSTORE_TEST_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="needs a PostgreSQL server: set KVSTORE_TEST_PG_URL"),
]

POSITIONAL = ("kv", "kv", "quant")  # every layer holds every position: a chunk's blob is a pure function of its key
DEDUP_WORKERS, DEDUP_AGENTS = 2, 12


def _fresh(tmp_path, name: str = "blobs") -> tuple[str, Path]:
    """(URL of a new database, blob folder) for a store of the test's own."""
    from conftest import fresh_pg_database

    return fresh_pg_database(), tmp_path / name


def _open(url: str, blobs, **kw) -> kvstore.Store:
    from reliability import synth

    kw.setdefault("chunk_size", synth.CHUNK)
    return kvstore.open(url, blobs=blobs, **kw)


def _child(role: str, *args: str) -> subprocess.Popen:
    """This file run as a child process in `role` (see main)."""
    from conftest import spawn_test_file

    return spawn_test_file(__file__, role, *args)


def _counts(store: kvstore.Store) -> dict:
    """What dedup decides: rows of each table, and blob files on disk."""
    st = store.stats()
    with store.engine.connect() as conn:
        from sqlalchemy import func, select

        from kvstore.index import schema

        layers = conn.execute(select(func.count()).select_from(schema.chunk_layers)).scalar_one()
    return {
        "blobs": st.blobs,
        "chunks": st.chunks,
        "chunk_layers": layers,
        "bytes_on_disk": st.bytes_on_disk,
        "files": sum(1 for _ in store.blobs.iter_files()),
    }


# -- dedup between processes -------------------------------------------------------------------------


def _dedup_agents() -> list[list[tuple[str, list[int]]]]:
    """Per worker, agents whose prompts share prefixes with each other and with the other worker's agents."""
    from reliability import synth

    rng = random.Random(7)
    plans = [[] for _ in range(DEDUP_WORKERS)]
    for i in range(DEDUP_AGENTS):
        prefix = synth.PREFIXES[i % len(synth.PREFIXES)]
        cut = rng.randint(len(prefix) // 2, len(prefix))
        for w in range(DEDUP_WORKERS):  # agent i of every worker shares the same prefix cut: a real race
            tail = [rng.randrange(5000) for _ in range(rng.randint(0, 30))]
            plans[w].append((f"w{w}-a{i}", prefix[:cut] + tail))
    return plans


def _save_all(store: kvstore.Store, agents: list[tuple[str, list[int]]]) -> int:
    """Save each agent's synthetic cache; returns the blobs this process wrote."""
    from reliability import synth

    written = 0
    for name, tokens in agents:
        snap = store.save(name, synth.make_cache(tokens, POSITIONAL), tokens, model=synth.FP)
        written += snap.blobs_written
    return written


def test_two_processes_saving_shared_prefixes_dedup_against_each_other(tmp_path):
    """Two processes save agents sharing prefixes at once: the store ends up exactly as one process leaves it."""
    from reliability import synth

    plans = _dedup_agents()
    ref_url, ref_blobs = _fresh(tmp_path, "ref-blobs")
    with _open(ref_url, ref_blobs) as ref:
        _save_all(ref, [a for plan in plans for a in plan])
        expected = _counts(ref)

    url, blobs = _fresh(tmp_path)
    _open(url, blobs).close()  # created once, so the workers race on chunks, not on the schema
    go = tmp_path / "go"
    procs = []
    for w, plan in enumerate(plans):
        agents = tmp_path / f"agents{w}.json"
        agents.write_text(json.dumps(plan))
        procs.append(
            _child(
                "dedup",
                url,
                str(blobs),
                str(agents),
                str(tmp_path / f"ready{w}"),
                str(go),
                str(tmp_path / f"out{w}.json"),
            )
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(DEDUP_WORKERS)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        assert time.monotonic() < deadline, "the workers never got ready"
        time.sleep(0.02)
    go.touch()  # both start saving at the same moment
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * DEDUP_WORKERS, errors
    written = sum(json.loads((tmp_path / f"out{w}.json").read_text())["written"] for w in range(DEDUP_WORKERS))

    with _open(url, blobs) as store:
        assert _counts(store) == expected
        assert expected["files"] == expected["blobs"]
        assert written >= expected["blobs"]  # every blob was written by someone (twice where the race hit)
        for name, tokens in (a for plan in plans for a in plan):
            cache, got = store.load(name, model=synth.FP)
            assert got == tokens
            assert synth.checksum(cache) == synth.expected_sum(tokens, POSITIONAL)
        assert store.fsck(grace=0).problems == ()


# -- the advisory locks ------------------------------------------------------------------------------


def test_gc_advisory_lock_excludes_a_second_gc(tmp_path):
    """While one gc holds the lock, another store's gc on the same database is refused; a gc elsewhere is not."""
    from kvstore.ops.gc import gc_lock

    url, blobs = _fresh(tmp_path)
    other_url, other_blobs = _fresh(tmp_path, "other-blobs")
    with _open(url, blobs) as first, _open(url, blobs) as second, _open(other_url, other_blobs) as elsewhere:
        with gc_lock(first):
            with pytest.raises(kvstore.StoreLockedError, match="another gc"):
                second.gc(grace=0)
            with pytest.raises(kvstore.StoreLockedError, match="another gc"):
                second.gc(dry_run=True)
            assert elsewhere.gc(grace=0).dry_run is False  # advisory locks are per database
        assert second.gc(grace=0).dry_run is False


def test_gc_lock_dies_with_its_process(tmp_path):
    """A gc killed while holding the lock does not leave the store locked: the server ends its session."""
    url, blobs = _fresh(tmp_path)
    _open(url, blobs).close()
    holder = _child("hold-gc-lock", url, str(blobs))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with _open(url, blobs) as store:
            with pytest.raises(kvstore.StoreLockedError):
                store.gc(grace=0)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            deadline = time.monotonic() + 30
            while True:  # the server notices the dead client when its socket closes
                try:
                    report = store.gc(grace=0)
                    break
                except kvstore.StoreLockedError:
                    assert time.monotonic() < deadline, "the dead gc's lock was never released"
                    time.sleep(0.05)
            assert report.dry_run is False
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


def test_writer_waits_for_the_write_lock_then_gives_up_with_store_locked(tmp_path):
    """The write lock is a transaction-level advisory lock: a second writer waits `timeout`, then StoreLockedError."""
    from reliability import synth

    from kvstore.index import db

    url, blobs = _fresh(tmp_path)
    tokens = synth.PREFIXES[0]
    with _open(url, blobs) as holder, _open(url, blobs, timeout=0.5) as waiter:
        with db.transaction(holder.engine, write=True, what="holding the lock"):
            with pytest.raises(kvstore.StoreLockedError, match="locked by another writer"):
                waiter.save("late", synth.make_cache(tokens), tokens, model=synth.FP)
            assert waiter.agents() == []  # readers never wait for the write lock
        snap = waiter.save("late", synth.make_cache(tokens), tokens, model=synth.FP)  # released at commit
        assert snap.n_tokens == len(tokens)
        assert [a.name for a in holder.agents()] == ["late"]


def test_fresh_database_opened_by_many_at_once_is_created_once(tmp_path):
    """Stores opening one empty database at the same moment: one schema, one settings row each, all usable."""
    from sqlalchemy import text

    url, blobs = _fresh(tmp_path)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def opener():
        try:
            barrier.wait()
            with _open(url, blobs) as s:
                s.agents()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with _open(url, blobs) as store, store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM store_meta WHERE key = 'chunk_size'")).scalar() == 1


# -- Alembic -----------------------------------------------------------------------------------------


def test_alembic_migration_from_empty_stamps_head(tmp_path):
    """`alembic upgrade head` on an empty PostgreSQL database builds the same schema as a fresh open, at head."""
    from alembic import command
    from reliability import synth
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.pool import NullPool

    from kvstore.index import db, schema

    url, blobs = _fresh(tmp_path)
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        command.upgrade(db._alembic_config(conn), "head")
        conn.commit()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == schema.SCHEMA_REVISION
        migrated = {t: sorted(c["name"] for c in inspect(conn).get_columns(t)) for t in schema.metadata.tables}
    engine.dispose()

    created_url, created_blobs = _fresh(tmp_path, "created-blobs")
    with _open(created_url, created_blobs) as fresh, fresh.engine.connect() as conn:
        created = {t: sorted(c["name"] for c in inspect(conn).get_columns(t)) for t in schema.metadata.tables}
    assert migrated == created

    tokens = synth.PREFIXES[2]
    with _open(url, blobs) as store:  # the migrated index is a store like any other
        assert store.schema_revision == schema.SCHEMA_REVISION
        store.save("a", synth.make_cache(tokens), tokens, model=synth.FP)
        cache, got = store.load("a", model=synth.FP)
        assert got == tokens and synth.checksum(cache) == synth.expected_sum(tokens)


def test_cli_migrate_on_an_empty_database_stamps_head(tmp_path):
    """`kvstore --store URL --blobs PATH migrate` sets up an empty database, and says it is up to date after."""
    from click.testing import CliRunner

    from kvstore.cli.main import cli
    from kvstore.index import schema

    url, blobs = _fresh(tmp_path)
    runner = CliRunner()
    done = runner.invoke(cli, ["--store", url, "--blobs", str(blobs), "migrate", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == {"from": None, "to": schema.SCHEMA_REVISION, "upgraded": True}
    status = runner.invoke(cli, ["--store", url, "--blobs", str(blobs), "migrate", "--status", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["up_to_date"] is True


# -- connections and their errors --------------------------------------------------------------------


def test_unreachable_server_is_a_store_error_that_names_the_fix(tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(host="127.0.0.1", port=1).render_as_string(hide_password=False)
    with pytest.raises(kvstore.IndexDatabaseError, match="cannot connect to the index database.*server is running"):
        kvstore.open(url, blobs=tmp_path / "blobs", timeout=2)


def test_missing_database_is_a_store_error_that_names_the_fix(tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(database="kvt_no_such_database").render_as_string(hide_password=False)
    with pytest.raises(kvstore.IndexDatabaseError, match="create the database"):
        kvstore.open(url, blobs=tmp_path / "blobs")


def test_readonly_store_is_refused_by_the_server_too(tmp_path):
    """readonly=True makes every transaction read-only on the server, not just in kvstore's own checks."""
    from reliability import synth
    from sqlalchemy import insert

    from kvstore.index import db, schema

    url, blobs = _fresh(tmp_path)
    tokens = synth.PREFIXES[1]
    with _open(url, blobs) as store:
        store.save("a", synth.make_cache(tokens), tokens, model=synth.FP)
    with _open(url, blobs, readonly=True) as ro:
        cache, got = ro.load("a", model=synth.FP)
        assert got == tokens
        with pytest.raises(kvstore.ReadOnlyStoreError, match="refuses writes"):
            with db.transaction(ro.engine, write=True, what="writing behind kvstore's back") as conn:
                conn.execute(insert(schema.store_meta).values(key="x", value="y"))


def test_bare_postgresql_url_uses_psycopg(tmp_path):
    """postgresql://… (no driver) means psycopg 3, the driver kvstore[postgres] installs, not psycopg2."""
    url, blobs = _fresh(tmp_path)
    bare = "postgresql://" + url.split("://", 1)[1]
    with kvstore.open(bare, blobs=blobs, chunk_size=16) as store:
        assert store.engine.dialect.driver == "psycopg"
        assert store.agents() == []


# -- the reliability suite's concurrency tests, on PostgreSQL -----------------------------------------


@pytest.mark.slow
def test_threads_save_while_gc_loops_on_postgres(tmp_path):
    """reliability/test_concurrency's thread test against a PostgreSQL index: nothing lost, nothing wrong."""
    from reliability import stress, synth
    from reliability.test_concurrency import SAVES, WORKERS, check_final

    url, blobs = _fresh(tmp_path)
    results = stress.run_threads(url, WORKERS, SAVES, 7, blobs=blobs)
    assert results["gc"] > 0
    assert check_final(url, results, blobs=blobs, chunk_size=synth.CHUNK) == len(
        {name for w in range(WORKERS) for name in results[w]["agents"]}
    )


@pytest.mark.slow
def test_processes_save_while_gc_loops_on_postgres(tmp_path):
    """reliability/test_concurrency's process test against a PostgreSQL index (separate sessions, real races)."""
    from reliability import synth
    from reliability.test_concurrency import SAVES, WORKERS, check_final

    url, blobs = _fresh(tmp_path)
    _open(url, blobs).close()
    stop = tmp_path / "stop"
    gc_proc = _child("gc", url, str(blobs), str(stop), str(tmp_path / "gc.json"))
    savers = [
        _child("saver", url, str(blobs), str(w), str(SAVES), str(100 + w), str(tmp_path / f"w{w}.json"))
        for w in range(WORKERS)
    ]
    errors = [p.communicate(timeout=600)[1] for p in savers]
    stop.touch()
    gc_err = gc_proc.communicate(timeout=600)[1]
    assert errors == [""] * WORKERS
    assert gc_err == ""
    assert [p.returncode for p in savers + [gc_proc]] == [0] * (WORKERS + 1)
    results = {w: json.loads((tmp_path / f"w{w}.json").read_text()) for w in range(WORKERS)}
    assert json.loads((tmp_path / "gc.json").read_text())["passes"] > 0
    check_final(url, results, blobs=blobs, chunk_size=synth.CHUNK)


# -- the child process -------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Roles: `dedup URL BLOBS AGENTS READY GO OUT`, `saver URL BLOBS WORKER SAVES SEED OUT`,
    `gc URL BLOBS STOP OUT`, `hold-gc-lock URL BLOBS`."""
    import traceback

    from reliability import stress

    role, url, blobs = argv[0], argv[1], Path(argv[2])
    try:
        with _open(url, blobs) as store:
            if role == "dedup":
                agents, ready, go, out = (Path(a) for a in argv[3:7])
                plan = [(name, tokens) for name, tokens in json.loads(agents.read_text())]
                from reliability import synth

                synth.make_cache(plan[0][1], POSITIONAL)  # warm mlx up before the start line
                store.agents()  # and the connection
                ready.touch()
                while not go.exists():
                    time.sleep(0.005)
                out.write_text(json.dumps({"written": _save_all(store, plan)}))
            elif role == "saver":
                worker, saves, seed, out = int(argv[3]), int(argv[4]), int(argv[5]), Path(argv[6])
                out.write_text(json.dumps(stress.saver(store, worker, saves, seed)))
            elif role == "gc":
                stop, out = Path(argv[3]), Path(argv[4])
                out.write_text(json.dumps({"passes": stress.collector(store, stop.exists)}))
            elif role == "hold-gc-lock":
                from kvstore.ops.gc import gc_lock

                with gc_lock(store):
                    print("locked", flush=True)
                    time.sleep(600)  # until the test kills us
            else:
                raise SystemExit(f"unknown role {role!r}")
    except BaseException:
        sys.stderr.write(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
