"""The index database: engine set-up, transactions, schema version checks and Alembic upgrades."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, inspect, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from . import schema
from ._crash import crash_point
from .errors import IndexDatabaseError, ReadOnlyStoreError, SchemaTooNewError, StoreFullError, StoreLockedError

# Taken by every writer on PostgreSQL: SQLite's BEGIN IMMEDIATE serializes writers, this does the same there.
PG_WRITE_LOCK = 0x6B7673746F7265  # "kvstore"
PG_GC_LOCK = PG_WRITE_LOCK + 1


def _migrations_dir() -> Path:
    import kvstore.migrations as m

    return Path(m.__file__).resolve().parent


def make_engine(url: str, timeout: float = 30.0, readonly: bool = False) -> Engine:
    """An engine for `url` with kvstore's connection settings applied to every connection."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's pysqlite recipe)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if not readonly:
                cur.execute("PRAGMA journal_mode = WAL")
            # FULL: an agent's record is primary data; one WAL fsync per save is cheap next to the blobs.
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            mode = conn.get_execution_options().get("kvstore_write") and "IMMEDIATE" or "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_pre_ping=True)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def parse_json(raw: str | None, what: str):
    """JSON text stored in the index; damage there is an IndexDatabaseError naming the row, never a ValueError."""
    import json

    try:
        return json.loads(raw or "{}")
    except ValueError as e:
        raise IndexDatabaseError(f"the index holds damaged JSON for {what} ({e}); run `kvstore fsck --repair`"
                                 ) from None


def translate(e: Exception, what: str) -> Exception:
    """A StoreError for a database error a caller can act on."""
    orig = getattr(e, "orig", e)
    msg = str(orig).lower()
    if "locked" in msg or "busy" in msg or "lock timeout" in msg or "could not obtain lock" in msg:
        return StoreLockedError(f"the store stayed locked by another writer while {what}: {orig}")
    if "readonly" in msg or "read-only" in msg or "read only" in msg:
        return ReadOnlyStoreError(f"the store is read-only; cannot {what}")
    if "disk is full" in msg or "no space" in msg or "database or disk is full" in msg:
        return StoreFullError(28, f"disk full while {what}; nothing was committed")
    if "malformed" in msg or "not a database" in msg or "disk i/o error" in msg or "corrupt" in msg:
        return IndexDatabaseError(f"the index database is damaged ({orig}); run `kvstore fsck` or restore a backup")
    return IndexDatabaseError(f"index error while {what}: {orig}")


@contextlib.contextmanager
def transaction(engine: Engine, write: bool, what: str) -> Iterator[Connection]:
    """One transaction; writers take the write lock first (SQLite BEGIN IMMEDIATE, PostgreSQL advisory)."""
    try:
        with engine.connect() as conn:
            if write:
                conn = conn.execution_options(kvstore_write=True)
            with conn.begin():
                if write and engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITE_LOCK})
                yield conn
                if write:
                    crash_point("txn.before_commit")
        if write:
            crash_point("txn.after_commit")
    except (OperationalError, DBAPIError, sqlite3.Error) as e:
        raise translate(e, what) from e


def current_revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def known_revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    return [s.revision for s in ScriptDirectory(str(_migrations_dir())).walk_revisions()]


def _alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["connection"] = conn
    return cfg


def ensure_schema(engine: Engine, readonly: bool = False, initial_meta: dict | None = None) -> str:
    """Create a fresh index at head, upgrade an old one, refuse a newer one. Returns the revision."""
    try:
        with engine.connect() as conn:
            has_tables = inspect(conn).has_table("store_meta")
            rev = current_revision(conn)
    except (OperationalError, DBAPIError, sqlite3.Error) as e:  # "file is not a database", malformed, locked
        raise translate(e, "opening the index") from e
    if rev == schema.SCHEMA_REVISION:
        return rev
    if rev is not None and rev not in known_revisions():
        raise SchemaTooNewError(
            f"the index was written by a newer kvstore (schema revision {rev}; this kvstore knows up to "
            f"{schema.SCHEMA_REVISION}): upgrade kvstore (pip install -U kvstore) to open it"
        )
    if readonly:
        raise ReadOnlyStoreError(
            f"the index needs a schema upgrade ({rev} -> {schema.SCHEMA_REVISION}) but the store is read-only")
    from alembic import command

    with transaction(engine, write=True, what="setting up the index") as conn:
        if not has_tables:
            # A fresh database: create everything at head and stamp it (optuna's way), in one transaction.
            schema.metadata.create_all(conn)
            command.stamp(_alembic_config(conn), "head")
            if initial_meta and not read_meta(conn):  # settings commit with the tables, or not at all
                write_meta(conn, initial_meta)
            return schema.SCHEMA_REVISION
    with engine.connect() as conn:
        command.upgrade(_alembic_config(conn), "head")
        conn.commit()
    return schema.SCHEMA_REVISION


def migration_status(engine: Engine) -> dict:
    with engine.connect() as conn:
        rev = current_revision(conn)
    return {"current": rev, "head": schema.SCHEMA_REVISION, "up_to_date": rev == schema.SCHEMA_REVISION}


def upgrade(engine: Engine) -> dict:
    before = migration_status(engine)["current"]
    ensure_schema(engine)
    return {"from": before, "to": schema.SCHEMA_REVISION}


def read_meta(conn: Connection) -> dict[str, str]:
    return dict(conn.execute(select(schema.store_meta.c.key, schema.store_meta.c.value)).all())


def write_meta(conn: Connection, values: dict[str, str]) -> None:
    conn.execute(insert(schema.store_meta), [{"key": k, "value": str(v)} for k, v in values.items()])


def now() -> float:
    return time.time()


def insert_ignore(conn: Connection, table, rows: list[dict]) -> None:
    """Insert rows, skipping those whose primary key exists (dedup: another save got there first)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    for i in range(0, len(rows), 500):
        conn.execute(dialect_insert(table).on_conflict_do_nothing(), rows[i : i + 500])
