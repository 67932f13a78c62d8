"""The index database: engine set-up, transactions, schema version checks and Alembic upgrades."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, create_engine, event, insert, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from kvstore._crash import crash_point
from kvstore.errors import IndexDatabaseError, ReadOnlyStoreError, SchemaTooNewError
from kvstore.index import reads, schema
from kvstore.index.prepared import Prepared
from kvstore.index.translate import parse_json, translate  # noqa: F401 (db.parse_json: its callers' name)

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
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                if not readonly:
                    cur.execute("PRAGMA journal_mode = WAL")
                # FULL: an agent's record is primary data; one WAL fsync per save is cheap next to the blobs.
                cur.execute("PRAGMA synchronous = FULL")
                cur.execute("PRAGMA foreign_keys = ON")
            except UnicodeDecodeError as e:
                # A damaged header can make SQLite's own error text undecodable: still a damaged database.
                raise sqlite3.DatabaseError(f"database disk image is malformed (undecodable error: {e})") from None
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            mode = conn.get_execution_options().get("kvstore_write") and "IMMEDIATE" or "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    if make_url(url).get_backend_name() == "postgresql":
        return _postgres_engine(url, timeout, readonly)
    return create_engine(url, pool_pre_ping=True)


def _postgres_engine(url: str, timeout: float, readonly: bool) -> Engine:
    """A PostgreSQL engine: psycopg 3, READ COMMITTED, lock_timeout = timeout, fork-safe pool."""
    u = make_url(url)
    if u.drivername == "postgresql":  # a bare postgresql:// would mean psycopg2; the extra installs psycopg 3
        u = u.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in u.query:
        connect_args["connect_timeout"] = max(2, int(timeout))  # libpq waits at least 2 s
    if "application_name" not in u.query:
        connect_args["application_name"] = "kvstore"  # how a DBA tells our sessions apart
    try:
        # READ COMMITTED whatever the server's default: a writer waits for the advisory lock inside its
        # transaction, and each later statement must see what the writer before it committed
        # (under REPEATABLE READ its snapshot would predate that commit).
        engine = create_engine(u, pool_pre_ping=True, isolation_level="READ COMMITTED", connect_args=connect_args)
    except ModuleNotFoundError as e:
        raise IndexDatabaseError(
            f"a PostgreSQL index needs the psycopg driver ({e}): pip install 'kvstore[postgres]'"
        ) from None

    @event.listens_for(engine, "connect")
    def _session(dbapi_conn, record):
        record.info["pid"] = os.getpid()
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True  # SET outside any transaction, so it lasts for the session
        with dbapi_conn.cursor() as cur:
            # Waits for the write lock (pg_advisory_xact_lock) and row locks end after `timeout`,
            # as SQLite's busy_timeout does: StoreLockedError rather than a hang behind a stuck writer.
            cur.execute(f"SET lock_timeout = {max(1, int(timeout * 1000))}")
            if readonly:
                cur.execute("SET default_transaction_read_only = on")
        dbapi_conn.autocommit = autocommit

    @event.listens_for(engine, "checkout")
    def _same_process(dbapi_conn, record, proxy):
        # A pooled connection inherited across fork() shares its socket with the parent: never reuse it
        # (SQLAlchemy's documented multiprocessing recipe).
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise DisconnectionError("connection belongs to another process")

    return engine


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


OPEN_ATTEMPTS = 40  # ~16 s of waiting in all, past any creation's WAL switch


def ensure_schema(engine: Engine, readonly: bool = False, initial_meta: dict | None = None) -> str:
    """Create a fresh index at head, upgrade an old one, refuse a newer one. Returns the revision."""
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with engine.connect() as conn:
                has_tables = inspect(conn).has_table("store_meta")
                rev = current_revision(conn)
            break
        except (OperationalError, DBAPIError, sqlite3.Error) as e:  # "file is not a database", malformed, locked
            # SQLite answers "locked" at once, without its busy timeout, while another process that is creating
            # the same store switches it to WAL (test_processes_creating_one_store_at_once): wait and look again.
            if "locked" in str(e) and attempt < OPEN_ATTEMPTS - 1:
                time.sleep(0.02 * (attempt + 1))
                continue
            raise translate(e, "opening the index") from e
    if rev == schema.SCHEMA_REVISION:
        return rev
    if rev is None and has_tables:
        # Alembic would take it for an empty database and fail creating tables that exist (issue 15, item 11).
        raise IndexDatabaseError(
            "the index has kvstore's tables but no alembic_version table (its schema "
            "version record): it is damaged; restore index.db from a backup"
        )
    if rev is not None and rev not in known_revisions():
        raise SchemaTooNewError(
            f"the index was written by a newer kvstore (schema revision {rev}; this kvstore knows up to "
            f"{schema.SCHEMA_REVISION}): upgrade kvstore (pip install -U kvstore) to open it"
        )
    if readonly:
        raise ReadOnlyStoreError(
            f"the index needs a schema upgrade ({rev} -> {schema.SCHEMA_REVISION}) but the store is read-only"
        )
    from alembic import command

    with transaction(engine, write=True, what="setting up the index") as conn:
        # Under the write lock: another process creating the same store may have done it meanwhile.
        if not has_tables and not inspect(conn).has_table("store_meta"):
            # A fresh database: create everything at head and stamp it (optuna's way), in one transaction.
            schema.metadata.create_all(conn)
            command.stamp(_alembic_config(conn), "head")
            if initial_meta and not read_meta(conn):  # settings commit with the tables, or not at all
                write_meta(conn, initial_meta)
            from kvstore.index import removals  # (it imports this module)

            removals.changed(conn)  # the token a fresh index starts with (revision 0004 gives older ones theirs)
            return schema.SCHEMA_REVISION
    with engine.connect() as conn, _upgrade_lock(conn):
        command.upgrade(_alembic_config(conn), "head")
    return schema.SCHEMA_REVISION


@contextlib.contextmanager
def _upgrade_lock(conn: Connection) -> Iterator[None]:
    """Hold the write lock across the upgrade: one process upgrades, the others wait, then find the
    index at head. SQLite: one BEGIN IMMEDIATE transaction that Alembic joins (it reads the revision
    under the lock, so a second process does not replay a migration that just committed). PostgreSQL:
    the advisory write lock, held across Alembic's own per-migration transactions."""
    if conn.dialect.name == "sqlite":
        conn.execution_options(kvstore_write=True)
        with conn.begin():
            yield
        return
    if conn.dialect.name != "postgresql":
        yield
        if conn.in_transaction():
            conn.commit()
        return
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_WRITE_LOCK})
    conn.commit()
    try:
        yield
        if conn.in_transaction():
            conn.commit()
    finally:
        conn.rollback()  # a failed migration leaves its transaction open; the unlock needs a fresh one
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_WRITE_LOCK})
        conn.commit()


def migration_status(engine: Engine) -> dict:
    with engine.connect() as conn:
        rev = current_revision(conn)
    return {"current": rev, "head": schema.SCHEMA_REVISION, "up_to_date": rev == schema.SCHEMA_REVISION}


def upgrade(engine: Engine) -> dict:
    before = migration_status(engine)["current"]
    ensure_schema(engine)
    return {"from": before, "to": schema.SCHEMA_REVISION}


class SqlAlchemyReads:
    """A SQLAlchemy connection as a `reads.Reads`: the plain SQL of kvstore.index.reads on any dialect."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        return [tuple(r) for r in self.conn.execute(text(sql), params or {})]


@contextlib.contextmanager
def reading(engine: Engine, what: str) -> Iterator[SqlAlchemyReads]:
    """A read transaction for the queries of kvstore.index.reads."""
    with transaction(engine, write=False, what=what) as conn:
        yield SqlAlchemyReads(conn)


_META_VALUE = Prepared(lambda _d: select(schema.store_meta.c.value).where(schema.store_meta.c.key == bindparam("key")))


def meta_value(conn: Connection, key: str) -> str | None:
    """One store_meta value (None: no such key), by a statement compiled once (a save reads two)."""
    got = _META_VALUE.scalar(conn, key=key)
    return None if got is None else str(got)


def read_meta(conn: Connection) -> dict[str, str]:
    return reads.read_meta(SqlAlchemyReads(conn))


def write_meta(conn: Connection, values: dict[str, object]) -> None:
    conn.execute(insert(schema.store_meta), [{"key": k, "value": str(v)} for k, v in values.items()])


def now() -> float:
    return time.time()


def _insert_ignoring(table, columns: tuple[str, ...]) -> Prepared:
    """INSERT ... ON CONFLICT DO NOTHING of these columns of `table`, in the dialect's words."""

    def build(dialect):
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(table).values({c: bindparam(c) for c in columns}).on_conflict_do_nothing()

    return Prepared(build)


_INSERT_IGNORING: dict[tuple[str, tuple[str, ...]], Prepared] = {}


def insert_ignore(conn: Connection, table, rows: list[dict]) -> None:
    """Insert rows, skipping those whose primary key exists (dedup: another save got there first).
    Every row names the same columns."""
    if not rows:
        return
    key = (table.name, tuple(rows[0]))
    prepared = _INSERT_IGNORING.get(key) or _INSERT_IGNORING.setdefault(key, _insert_ignoring(table, key[1]))
    for i in range(0, len(rows), 500):
        prepared.many(conn, rows[i : i + 500])
