"""Statements of the save and restore paths, compiled once per dialect and run on the driver's cursor.

A save runs about fifteen statements and a restore five. Through SQLAlchemy's execution each one
costs 50-70 us of Python (building the statement, its cache key, result processing) where the
driver itself takes 2-20 us: about a millisecond of a small save or restore, whose whole budget is
a few milliseconds. A `Prepared` statement is built and compiled once per dialect; a call binds its
parameters in the dialect's style and runs it on the DB-API cursor of the caller's connection, in
the caller's transaction. Driver errors come back as SQLAlchemy's `DBAPIError`, which
`db.transaction` turns into a StoreError like any other.

Only for statements with plain-value parameters whose results need no type processing: both drivers
hand back bytes for binary columns, and callers convert what they keep. An `IN (...)` over a list of
values is a `PreparedIn`: a few statements of fixed widths, each with that many plain parameters,
rather than SQLAlchemy's expanding `IN`, which coerces and renders every value on every call (a
save at turn 512 of a chat spent 60 ms a lookup there, issue 23).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import bindparam, insert
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError


class Prepared:
    """One statement: `build(dialect)` makes it (most ignore the dialect; an upsert needs it)."""

    def __init__(self, build: Callable[[Dialect], Any]):
        self._build = build
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def _sql(self, dialect: Dialect) -> tuple[str, tuple[str, ...] | None]:
        got = self._compiled.get(dialect.name)
        if got is None:
            compiled = self._build(dialect).compile(dialect=dialect)
            order = tuple(compiled.positiontup) if compiled.positional else None
            got = self._compiled[dialect.name] = (compiled.string, order)
        return got

    def _run(self, conn: Connection, params: Sequence[dict], many: bool):
        sql, order = self._sql(conn.dialect)
        if order is None:
            args: list = list(params)
        elif len(order) < 2:  # itemgetter of one name returns the bare value, of none fails
            args = [tuple(p[name] for name in order) for p in params]
        else:
            pick = itemgetter(*order)
            args = [pick(p) for p in params]
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            if many:
                cursor.executemany(sql, args)
                return cursor, None
            cursor.execute(sql, args[0])
            return cursor, cursor.fetchall() if cursor.description is not None else None
        except conn.dialect.loaded_dbapi.Error as e:
            cursor.close()
            raise DBAPIError.instance(sql, args, e, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect) from e

    def rows(self, conn: Connection, **params) -> list[tuple]:
        """Every row the statement returns."""
        cursor, rows = self._run(conn, [params], many=False)
        cursor.close()
        return rows or []

    def first(self, conn: Connection, **params) -> tuple | None:
        rows = self.rows(conn, **params)
        return rows[0] if rows else None

    def scalar(self, conn: Connection, **params):
        row = self.first(conn, **params)
        return None if row is None else row[0]

    def many(self, conn: Connection, params: Sequence[dict]) -> None:
        """Run it once per parameter set (an insert of many rows)."""
        if params:
            self._run(conn, params, many=True)[0].close()


def _of_width(build: Callable[[list], Any], width: int) -> Callable[[Dialect], Any]:
    """A Prepared's builder: `build` over `width` bind parameters v0, v1, ..."""

    def of_dialect(_dialect: Dialect) -> Any:
        return build([bindparam(f"v{i}") for i in range(width)])

    return of_dialect


class PreparedIn:
    """A statement with one `IN (...)` of values: `build(params)` makes it from a list of bind parameters.

    It is compiled for a few fixed widths; a call runs the values in parts of at most the widest, each
    part padded to the next width by repeating its last value (a repeat changes nothing in an `IN`),
    and fetches every row of each part at once.
    """

    # Steps of at most 1.5x: a padded value costs about as much as a real one (a save at turn 512 of a chat,
    # 131 keys, spent 0.3 ms more per lookup padded to 400 than to 192). The widest stays under SQLite's and
    # PostgreSQL's bound-parameter limits.
    WIDTHS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 400)

    def __init__(self, build: Callable[[list], Any]):
        self._by_width = {w: Prepared(_of_width(build, w)) for w in self.WIDTHS}

    def rows(self, conn: Connection, values: Sequence) -> list[tuple]:
        """Every row the statement returns for `values` (duplicates among the rows if parts overlap)."""
        out: list[tuple] = []
        widest = self.WIDTHS[-1]
        for i in range(0, len(values), widest):
            part = list(values[i : i + widest])
            width = next(w for w in self.WIDTHS if w >= len(part))
            part += [part[-1]] * (width - len(part))
            out += self._by_width[width].rows(conn, **{f"v{j}": v for j, v in enumerate(part)})
        return out


def inserting(table, columns: Sequence[str], returning=None) -> Prepared:
    """INSERT of these columns of `table`, each bound by its own name (and RETURNING `returning`)."""

    def build(_dialect):
        stmt = insert(table).values({c: bindparam(c) for c in columns})
        return stmt.returning(returning) if returning is not None else stmt

    return Prepared(build)
