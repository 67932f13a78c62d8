"""Database errors as the StoreErrors a caller can act on, and JSON read back from the index.

Apart from kvstore.index.db so that a read on the standard library's sqlite3 (kvstore.index.sqlite_reads)
reports a locked, read-only or damaged index in the same words as one through SQLAlchemy, without importing it.
"""

from __future__ import annotations

from kvstore.errors import IndexDatabaseError, ReadOnlyStoreError, StoreFullError, StoreLockedError

__all__ = ["translate", "parse_json"]


def parse_json(raw: str | None, what: str):
    """JSON text stored in the index; damage there is an IndexDatabaseError naming the row, never a ValueError."""
    import json

    try:
        return json.loads(raw or "{}")
    except ValueError as e:
        raise IndexDatabaseError(
            f"the index holds damaged JSON for {what} ({e}); run `kvstore fsck --repair`"
        ) from None


def translate(e: Exception, what: str) -> Exception:
    """A StoreError for a database error a caller can act on."""
    orig = getattr(e, "orig", e)
    if type(orig).__module__.split(".")[0] in ("psycopg", "psycopg2"):
        return _translate_postgres(orig, what)
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


# SQLSTATE classes and codes a caller can act on (PostgreSQL manual, appendix A).
_PG_LOCKED = {"55P03": "lock_timeout passed", "40P01": "deadlock", "40001": "serialization failure"}
_PG_READONLY = {"25006", "42501"}  # read-only transaction (a standby, or readonly=True); no privilege
_PG_DAMAGED = {"XX001", "XX002"}  # data or index corrupted


def _translate_postgres(orig: Exception, what: str) -> Exception:
    """A StoreError for a psycopg error, by SQLSTATE; a failed connection has none and is told by its text."""
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if state in _PG_LOCKED:
        return StoreLockedError(
            f"the store stayed locked by another writer while {what} ({_PG_LOCKED[state]}): "
            "try again, or open the store with a longer timeout="
        )
    if state in _PG_READONLY:
        return ReadOnlyStoreError(
            f"the index database refuses writes while {what} ({first}): open the store "
            "with readonly=True, or use a primary server and a user allowed to write"
        )
    if state.startswith("53"):  # insufficient resources: disk full, out of memory, too many connections
        if state == "53100":
            return StoreFullError(28, f"the database server's disk is full while {what}; nothing was committed")
        return IndexDatabaseError(f"the database server is out of resources while {what} ({first}); try again later")
    if state in _PG_DAMAGED:
        return IndexDatabaseError(f"the index database is damaged ({first}); restore it from a backup")
    low = first.lower()
    if not state and ("connection failed" in low or "could not connect" in low or "could not translate" in low):
        # libpq's connection errors carry no SQLSTATE: what failed is in the server's FATAL line.
        if "database" in low and "does not exist" in low:
            hint = "create the database (createdb NAME, or CREATE DATABASE) or fix the URL"
        elif "password" in low or "role" in low or "authentication" in low or "pg_hba" in low:
            hint = "check the user and password in the URL (or ~/.pgpass) and the server's pg_hba.conf"
        else:
            hint = "check the URL's host and port, and that the PostgreSQL server is running"
        return IndexDatabaseError(f"cannot connect to the index database ({first}): {hint}")
    if state.startswith("08") or state.startswith("57P") or not state and "connection" in low:
        return IndexDatabaseError(
            f"lost the connection to the index database while {what} ({first}): "
            "check the server and try again (a write either committed whole or not at all)"
        )
    return IndexDatabaseError(f"index error while {what}: {first}")
