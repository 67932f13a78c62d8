"""The layer rows a save's chain already has, read by whole chunks: a turn's save costs the same at any length.

A chat's save lists every chunk of its history, and all but the last few are held whole: a row for every
layer of the model, each from the chunk's first token (`first` = 0). Fetching every (chunk, layer) row of
the chain into Python, and planning over each, made a turn's save grow with the history (issue 23, point
5: 4.5x from turn 8 to turn 512). The index answers instead which keys are whole, one short row per key
(covered by ix_chunk_layers_first); only the other keys' rows come back. The planner skips whole chunks:
no layer of one can be missing or held from a later token than a cache holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import func, literal_column, select

from kvstore.index import schema
from kvstore.index.prepared import PreparedIn

__all__ = ["StoredLayers", "stored_layers", "whole_present"]

_cl = schema.chunk_layers
_ROWS_OF = PreparedIn(lambda keys: select(_cl.c.chunk_key, _cl.c.layer, _cl.c.first).where(_cl.c.chunk_key.in_(keys)))
_WHOLE: dict[int, PreparedIn] = {}  # by the model's number of slots
_COUNT: dict[int, PreparedIn] = {}


def _slots(n: int) -> Any:
    # The slots are ints of a layout: written into the statement, compiled once per model width.
    return _cl.c.layer.between(literal_column("0"), literal_column(str(int(n) - 1)))


def _whole_of(n: int) -> PreparedIn:
    """Keys (of a list) with a row for each of slots 0..n-1, every one from the chunk's first token."""
    got = _WHOLE.get(n)
    if got is None:

        def build(keys: list) -> Any:
            return (
                select(_cl.c.chunk_key)
                .where(_cl.c.chunk_key.in_(keys), _slots(n), _cl.c.first == literal_column("0"))
                .group_by(_cl.c.chunk_key)
                .having(func.count() == literal_column(str(int(n))))
            )

        got = _WHOLE[n] = PreparedIn(build)
    return got


def _count_of(n: int) -> PreparedIn:
    """The count of rows of slots 0..n-1 of some keys."""
    got = _COUNT.get(n)
    if got is None:

        def build(keys: list) -> Any:
            return select(func.count()).select_from(_cl).where(_cl.c.chunk_key.in_(keys), _slots(n))

        got = _COUNT[n] = PreparedIn(build)
    return got


class StoredLayers(Mapping[tuple[bytes, int], int]):
    """{(chunk key, slot): first} of the layer rows the index has for some keys, as `queries.existing_layers`
    gives it, held as the keys whole in every slot 0..slots-1 (first 0) and the rows of the others."""

    __slots__ = ("whole", "rows", "slots")

    def __init__(self, whole: frozenset[bytes], rows: dict[tuple[bytes, int], int], slots: int):
        self.whole = whole  # keys with a row for every slot 0..slots-1, each with first 0
        self.rows = rows  # every row of the other keys
        self.slots = slots

    def __getitem__(self, pair: tuple[bytes, int]) -> int:
        key, slot = pair
        if key in self.whole and 0 <= slot < self.slots:
            return 0
        return self.rows[pair]

    def get(self, pair, default=None):  # Mapping.get without raising and catching KeyError: the planner asks often
        if pair[0] in self.whole and 0 <= pair[1] < self.slots:
            return 0
        return self.rows.get(pair, default)

    def __contains__(self, pair: object) -> bool:
        if not isinstance(pair, tuple) or len(pair) != 2:
            return False
        if pair[0] in self.whole and isinstance(pair[1], int) and 0 <= pair[1] < self.slots:
            return True
        return pair in self.rows

    def __len__(self) -> int:
        return len(self.whole) * self.slots + len(self.rows)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        for key in self.whole:
            for slot in range(self.slots):
                yield key, slot
        yield from self.rows

    def unfilled(self, keys: Sequence[bytes]) -> list[int]:
        """Indexes of `keys` that are not held whole: the only chunks a save may have to write."""
        whole = self.whole
        return [i for i, key in enumerate(keys) if key not in whole]


def stored_layers(conn, keys: Sequence[bytes], *, slots: int) -> StoredLayers:
    """The layer rows the index has for `keys`, of a model with `slots` slots (see StoredLayers)."""
    if slots <= 0:
        return StoredLayers(frozenset(), _rows(conn, keys), max(slots, 0))
    whole = frozenset(bytes(k) for (k,) in _whole_of(slots).rows(conn, keys))
    rest = [k for k in dict.fromkeys(keys) if k not in whole]
    return StoredLayers(whole, _rows(conn, rest) if rest else {}, slots)


def _rows(conn, keys: Sequence[bytes]) -> dict[tuple[bytes, int], int]:
    # psycopg hands back memoryview for bytea
    return {(bytes(k), layer): first for k, layer, first in _ROWS_OF.rows(conn, list(keys))}


def whole_present(conn, layers: StoredLayers) -> bool:
    """Whether every key `layers` found whole still has a row in each of its slots (a gc may have run since)."""
    if not layers.whole:
        return True
    keys = list(layers.whole)
    # Parts of at most PreparedIn's widest hold distinct keys: the counts add up.
    return sum(n for (n,) in _count_of(layers.slots).rows(conn, keys)) == len(keys) * layers.slots
