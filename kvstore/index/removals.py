"""A token that changes whenever the index loses a layer row: what lets a save trust what it looked up before.

A chat's save asks which chunks of its history the index holds whole (kvstore.index.layers), and its commit
asks again under the write lock, in case a gc removed one since (kvstore.index.commit). Both questions grow
with the history, while the answer changes only when rows are removed: a save only ever adds layer rows or
widens them (`queries.widen_layer_rows`). So every statement that deletes layer rows (gc, `discard_blob`,
fsck's repairs) also gives `store_meta` row `removals` a new random value, in its own transaction; a
reader takes the value *before* its lookups. If the value is the same later, nothing was removed in
between: a process may keep the chunks it found whole (`layers.WholeSeen`), and a commit may skip its
re-check. A missing row (an index written before revision 0004) trusts nothing.

Revision 0004 made an older kvstore, whose gc does not change the token, refuse to open the index.
"""

from __future__ import annotations

import uuid

from sqlalchemy import bindparam, update

from kvstore.index import db, schema
from kvstore.index.prepared import Prepared

__all__ = ["KEY", "token", "changed"]

KEY = "removals"  # the store_meta key

_sm = schema.store_meta
_SET = Prepared(lambda _d: update(_sm).where(_sm.c.key == bindparam("key")).values(value=bindparam("value")))


def token(conn) -> str | None:
    """The current token (None: the index keeps none, trust nothing). Read it before the lookups it vouches for."""
    return db.meta_value(conn, KEY)


def changed(conn) -> None:
    """Layer rows were (or are being) removed in this write transaction: give the token a new value."""
    value = uuid.uuid4().hex
    db.insert_ignore(conn, _sm, [{"key": KEY, "value": value}])
    _SET.many(conn, [{"key": KEY, "value": value}])
