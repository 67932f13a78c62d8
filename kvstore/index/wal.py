"""The write-ahead log of a SQLite index: checkpointed so that the next write rewinds into its existing pages.

Every SQLite write, a delete too, appends to the WAL first; after a checkpoint the next transaction reuses
the WAL file's pages from its start instead of growing it, which is what lets a delete or a gc write on a
full disk (kvstore.ops.reserve). A PostgreSQL index has no such file here: nothing to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["checkpoint"]


def checkpoint(engine: Engine, *, truncate: bool = False) -> None:
    """Move the WAL's frames into the index file and restart the WAL (a no-op on PostgreSQL); with
    `truncate`, also cut the WAL file to zero bytes, so that its size counts only what came since."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'RESTART'})")
