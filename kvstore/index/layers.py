"""The layer rows a save's chain already has, read by whole chunks: a turn's save costs the same at any length.

A chat's save lists every chunk of its history, and all but the last few are held whole: a row for every
layer of the model, each from the chunk's first token (`first` = 0). Fetching every (chunk, layer) row of
the chain into Python, and planning over each, made a turn's save grow with the history (issue 23, point
5: 4.5x from turn 8 to turn 512). The index answers instead which keys are whole, one short row per key
(covered by ix_chunk_layers_first); only the other keys' rows come back. The planner skips whole chunks:
no layer of one can be missing or held from a later token than a cache holds it.

That answer still reads every key of the chain. A process remembers the keys it found whole
(`WholeSeen`), valid while the index's removals token (kvstore.index.removals) stays the same: only a
removal can make a whole chunk less than whole, so a turn's save asks the index about its new keys only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import func, literal_column, select

from kvstore.index import removals, schema
from kvstore.index.prepared import PreparedIn

__all__ = ["StoredLayers", "WholeSeen", "stored_layers", "whole_present"]

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

    __slots__ = ("whole", "rows", "slots", "token")

    def __init__(
        self, whole: frozenset[bytes], rows: dict[tuple[bytes, int], int], slots: int, token: str | None = None
    ):
        self.whole = whole  # keys with a row for every slot 0..slots-1, each with first 0
        self.rows = rows  # every row of the other keys
        self.slots = slots
        self.token = token  # the removals token read before the lookups (None: not read)

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


class WholeSeen:
    """Chunk keys a process found held whole, per model width, and the removals token they were found under.

    One per Store, shared by its threads (a key is only ever added under the token it was found under, so a
    lookup needs no lock). Valid only while the index's token is the same (kvstore.index.removals);
    bounded: past `limit` keys of a width it starts again, and the index answers the rest."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[str, set[bytes]]] = {}  # slots -> (token, keys)

    def under(self, token: str | None, slots: int) -> set[bytes] | frozenset[bytes]:
        """The keys found whole under `token` (none if the token changed since, or is None). Read only."""
        got = self._seen.get(slots)
        return got[1] if token is not None and got is not None and got[0] == token else frozenset()

    def add(self, token: str | None, slots: int, keys: frozenset[bytes]) -> None:
        """Remember `keys`, found whole after `token` was read (forgetting the keys of any other token)."""
        if token is None or not keys:
            return
        with self._lock:
            got = self._seen.get(slots)
            if got is None or got[0] != token or len(got[1]) + len(keys) > self.limit:
                self._seen[slots] = (token, set(keys))  # a new set: readers of the old one keep theirs
            else:
                got[1].update(keys)


def stored_layers(conn, keys: Sequence[bytes], *, slots: int, seen: WholeSeen | None = None) -> StoredLayers:
    """The layer rows the index has for `keys`, of a model with `slots` slots (see StoredLayers).

    With `seen`, the keys it found whole under the index's current removals token are not looked up again,
    and the keys found whole now join them."""
    if slots <= 0:
        return StoredLayers(frozenset(), _rows(conn, keys), max(slots, 0))
    token = removals.token(conn) if seen is not None else None  # before the lookups it vouches for
    known = seen.under(token, slots) if seen is not None else frozenset()
    distinct = dict.fromkeys(k if type(k) is bytes else bytes(k) for k in keys)
    ask = [k for k in distinct if k not in known] if known else list(distinct)
    found = frozenset(bytes(k) for (k,) in _whole_of(slots).rows(conn, ask)) if ask else frozenset()
    whole = found | known.intersection(distinct) if known else found
    if seen is not None:
        seen.add(token, slots, found)
    rest = [k for k in ask if k not in found]
    return StoredLayers(whole, _rows(conn, rest) if rest else {}, slots, token)


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
