"""The two ways a store is read return the same records (issue 17: read commands start without SQLAlchemy).

A `Store` reads its index through SQLAlchemy; the CLI's read commands on a folder store read it through the
standard library's sqlite3 (`StoreReader`). Both run the same SQL (kvstore.index.reads, reads_accounting): these
tests run both on one real store and compare every read, the CLI's output both ways, and what the fast path
leaves to a full open (an index to upgrade, one too new, damage), which must answer as it always has.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

import kvstore
from kvstore.cli.context import StoreRef
from kvstore.cli.main import cli
from kvstore.index.location import folder_url, index_path, rendered_url, sqlite_url
from kvstore.index.sqlite_reads import SqliteIndex
from kvstore.ops import accounting
from kvstore.store_reads import StoreReader
from kvstore.testing import make_cache, tokens

C = 16
MODEL, OTHER = "c1" * 16, "d2" * 16


def build(root: Path) -> None:
    """Agents that share a prefix, older and labelled snapshots, a fork, a second model with a name, a
    conversation, and an unverified import (its own namespace, shown as its real model)."""
    with kvstore.open(root, chunk_size=C) as store:
        prefix = tokens(3 * C, seed=1)
        for name, seed in (("tech", 2), ("biz", 3), ("ops", 4)):
            t = prefix + tokens(C + 5, seed=seed)
            meta = {
                "kvstore_agent": 1,
                "system_prompt": f"you are {name}",
                "messages": [{"role": "user", "content": "hi"}],
            }
            store.save(name, make_cache("kv", len(t), seed=seed), t, model=MODEL, meta=meta)
        longer = prefix + tokens(C + 5, seed=2) + tokens(2 * C, seed=5)
        store.save("tech", make_cache("kv", len(longer), seed=5), longer, model=MODEL, label="v2", pinned=True)
        store.fork("biz", "biz-fork")
        solo = tokens(2 * C + 3, seed=9)
        store.save("solo", make_cache("quantized", len(solo), seed=9), solo, model=OTHER)
        archive = root.parent / "tech.kvs"
        kvstore.export_agent(store, "ops", archive)
        kvstore.import_agent(store, archive, name="ops-imported")  # untrusted: a namespace of its own
    con = sqlite3.connect(index_path(root))
    con.execute("UPDATE models SET name = 'tiny-model' WHERE fingerprint = ?", (OTHER,))
    con.commit()
    con.close()


def everything(store) -> dict:
    """Every read the two paths share, as plain data."""
    names = [a.name for a in store.agents()]
    return {
        "agents": [a.as_dict() for a in store.agents()],
        "agent": {n: store.agent(n).as_dict() for n in names},
        "snapshots": {n: [s.as_dict() for s in store.snapshots(n)] for n in names},
        "stats": store.stats().as_dict(),
        "agent_bytes": {n: b.as_dict() for n, b in store.agent_bytes().items()},
        "agent_bytes_one": {n: store.agent_bytes(n)[n].as_dict() for n in names},
        "chunk_runs": {n: accounting.chunk_runs(store, n) for n in names},
        "models": accounting.model_summary(store),
        "model_names": accounting.model_names(store),
    }


@pytest.fixture
def built(tmp_path) -> Path:
    root = tmp_path / "store"
    build(root)
    return root


def test_store_and_reader_return_the_same_records(built, monkeypatch):
    with kvstore.open(built) as store:
        full = everything(store)
        monkeypatch.setattr(accounting, "PARALLEL_AGENTS", 1)  # the two-connection accounting too
        full_parallel = store.agent_bytes()
    reader = StoreReader.open(built)
    assert reader is not None
    with reader:
        fast = everything(reader)
        assert reader.agent_bytes() == full_parallel
    assert fast == full
    # The store is what the test meant to build: every path through the queries has rows to return.
    assert {a["name"] for a in fast["agents"]} == {"tech", "biz", "ops", "biz-fork", "solo", "ops-imported"}
    assert len(fast["snapshots"]["tech"]) == 2 and fast["snapshots"]["tech"][1]["pinned"] is True
    assert fast["agent"]["ops-imported"]["model"] == MODEL  # the namespace shows as its real model
    assert fast["model_names"][OTHER] == "tiny-model"
    assert fast["agent_bytes"]["biz"]["shared_bytes"] > 0 and fast["agent_bytes"]["solo"]["shared_bytes"] == 0


def test_both_refuse_an_unknown_agent_or_a_bad_name_alike(built):
    with kvstore.open(built) as store, StoreReader.open(built) as reader:
        for call in (
            lambda s: s.agent("nobody"),
            lambda s: s.snapshots("nobody"),
            lambda s: s.agent_bytes("nobody"),
            lambda s: accounting.chunk_runs(s, "nobody"),
            lambda s: s.agent("../x"),
        ):
            errors = []
            for s in (store, reader):
                with pytest.raises(kvstore.StoreError) as err:
                    call(s)
                errors.append((type(err.value), str(err.value)))
            assert errors[0] == errors[1]


def _invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


READ_COMMANDS = (["info"], ["agents"], ["models"], ["du"], ["du", "tech"], ["show", "tech"], ["show", "ops-imported"])


def test_cli_read_commands_print_the_same_either_way(built, monkeypatch):
    """The folder store reads through sqlite3; its sqlite:/// URL makes the CLI open it in full."""
    url = f"sqlite:///{index_path(built)}"
    assert isinstance(StoreRef(str(built), None).reader(), StoreReader)
    assert isinstance(StoreRef(url, None).reader(), kvstore.Store)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)  # "(5s ago)" columns: both runs at the same moment
    for args in READ_COMMANDS + (["show", "nobody"],):
        for fmt in ([], ["--json"]):
            fast = _invoke(["--store", str(built), *args, *fmt])
            full = _invoke(["--store", url, *args, *fmt])
            assert fast == full, args + fmt
            assert fast[0] == (1 if "nobody" in args else 0)
    assert json.loads(_invoke(["--store", str(built), "info", "--json"])[1])["agents"] == 6


def test_a_reader_writes_nothing_and_leaves_no_wal_behind(built):
    index = index_path(built)
    before = hashlib.sha256(index.read_bytes()).hexdigest()
    with StoreReader.open(built) as reader:
        everything(reader)
        with pytest.raises(kvstore.ReadOnlyStoreError), reader.reading("trying to write") as conn:
            conn.rows("DELETE FROM agents")
    assert hashlib.sha256(index.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in built.iterdir() if p.name.startswith("index.db")) == ["index.db"]


def test_a_read_only_reader_reports_what_a_read_only_store_does(built):
    """mode=ro, as kvstore.open(readonly=True) opens the index (read-only media; root can write anywhere here)."""
    index = SqliteIndex.open(built, readonly=True)
    assert index is not None and "mode=ro" in index.url
    with kvstore.open(built, readonly=True) as store, StoreReader(built, index) as reader:
        assert everything(reader) == everything(store)


@pytest.mark.parametrize("name", ["plain", "with space", "a+b", "col:on", "at@sign", "hash#tag", "ünï,;=&"])
def test_the_shown_url_is_sqlalchemys_rendering(tmp_path, name):
    root = tmp_path / name
    for readonly in (False, True):
        for immutable in (False, True):
            u = sqlite_url(root, readonly=readonly, immutable=immutable)
            assert rendered_url(u) == make_url(u).render_as_string(hide_password=True)
    build(root)
    with kvstore.open(root) as store, StoreReader.open(root) as reader:
        assert reader.stats() == store.stats()
        assert reader.stats().url == rendered_url(folder_url(root, readonly=False))


def _stamp(root: Path, sql: str) -> None:
    con = sqlite3.connect(index_path(root))
    con.execute(sql)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "damage, error",
    [
        ("UPDATE alembic_version SET version_num = '0099'", "newer kvstore (schema revision 0099"),
        ("UPDATE store_meta SET value = 'md5' WHERE key = 'hash'", "the store hashes with 'md5'"),
        ("UPDATE store_meta SET value = '9' WHERE key = 'format_version'", "uses blob format 9"),
        ("DROP TABLE alembic_version", "no alembic_version table"),
    ],
)
def test_what_a_full_open_refuses_the_cli_still_refuses_in_its_words(built, damage, error):
    _stamp(built, damage)
    assert StoreReader.open(built) is None
    with pytest.raises(kvstore.StoreError) as err:
        kvstore.open(built)
    assert error in str(err.value)
    for args in READ_COMMANDS:
        code, out, stderr = _invoke(["--store", str(built), *args])
        assert (code, out, stderr) == (1, "", f"kvstore: error: {err.value}\n"), args


def test_a_damaged_or_missing_index_is_left_to_a_full_open(tmp_path, built):
    assert StoreReader.open(tmp_path / "nowhere") is None
    (tmp_path / "empty").mkdir()
    assert StoreReader.open(tmp_path / "empty") is None
    index_path(built).write_bytes(b"not a database, not at all" * 200)
    assert StoreReader.open(built) is None
    code, _, stderr = _invoke(["--store", str(built), "info"])
    assert code == 1 and stderr.startswith("kvstore: error: the index database is damaged")


def test_an_index_to_upgrade_is_upgraded_by_the_read_command_as_before(built):
    """A read command on an index at an older revision opens it in full, which upgrades it (Alembic)."""
    from alembic import command
    from sqlalchemy import create_engine

    from kvstore.index import db

    old = built.parent / "old"
    old.mkdir()
    engine = create_engine(f"sqlite:///{index_path(old)}")
    with engine.connect() as conn:
        command.upgrade(db._alembic_config(conn), "0001")
        conn.commit()
    engine.dispose()
    assert StoreReader.open(old) is None
    code, out, _ = _invoke(["--store", str(old), "info", "--json"])
    assert code == 0 and json.loads(out)["schema_revision"] == kvstore.index.schema.SCHEMA_REVISION
    reader = StoreReader.open(old)  # now at head: the next read takes the fast path
    assert reader is not None
    reader.close()
