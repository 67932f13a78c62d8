"""The token list each agent saved last, so a turn's save reads and hashes only the ids its list added.

A chat saves its whole history every turn, as a Python list that grows by a few ids. Converting the list
reads every int object in it: one cache miss each, 0.45-0.65 ms at 33,000 tokens, the largest part of
what a turn's save cost more late in a chat than early (issue 23, point 5). Hashing its chunk keys again
cost another 0.07 ms.

Python compares two lists item by item and skips, without reading them, the items that are the same
object. Each entry keeps the list it converted, with one sentinel after its last id. With the sentinel
set to -1 and then to 2**32, `kept < tokens < kept` holds exactly when the kept ids are the first ids
of `tokens` and one more id in uint32's range follows them: at the first pair of items that differ,
the kept id cannot be both below and above the new one. The entry holds its items, so none is freed
and another object put at its address: an item that is the same object is the same id. Items that are
not the same object are compared by value, as Python compares lists; a list whose items are mostly other
objects (made again from text, as a server does for each request) is converted whole instead, as
comparing it by value costs more than converting it.

Only lists of plain ints are kept (their first and last item, and every item added, are checked: a
tokenizer's lists are). An int never changes its value, where an object of another type with an
`__index__` could. Anything else (a shorter list, an edited one, an array) is converted whole, as
before; a list that misses drops the agent's entry, and the lists after it are kept again after a
back-off (see RecentTokens).
"""

from __future__ import annotations

import array
import threading
from collections import OrderedDict

import numpy as np

from kvstore.cache.keys import U32_CODE, chunk_keys, tokens_to_array

AGENTS = 64  # entries kept: the most recently saved agents'
TOKENS = 1 << 20  # ids kept in all entries at most (about 12 bytes an id, and the ints they hold)
SAMPLES = 8  # items of the kept list checked to be the same objects before a whole comparison
MAX_BACKOFF = 64  # lists converted whole, at most, after a list that did not extend the kept one
_BELOW, _ABOVE = -1, 1 << 32  # the sentinels: below and above every uint32 id


class _Entry:
    __slots__ = ("kept", "ids", "keyed", "backoff", "skip")

    def __init__(self) -> None:
        self.kept: list | None = None  # the items converted, then a sentinel (None: not kept)
        self.ids: np.ndarray | None = None  # their uint32 ids (read-only)
        self.keyed: tuple[str, int, list[bytes]] | None = None  # fingerprint, chunk size, keys of whole chunks
        self.backoff = 0  # lists to convert whole, without keeping them, after the next miss
        self.skip = 0  # lists left to convert whole before one is kept again

    @property
    def size(self) -> int:
        return 0 if self.kept is None else len(self.kept) - 1


class RecentTokens:
    """Per agent name, the token list its last save converted and its chunk keys (one per store; thread-safe).

    Keeping a list copies its item pointers (0.25 ms for 32,000 ints made apart). A list that does not
    extend the kept one is converted whole and not kept, nor are the next 1, 2, 4 ... 64 lists after
    repeated misses: a caller that makes its list again every time pays about what it paid before."""

    def __init__(self, agents: int = AGENTS, tokens: int = TOKENS):
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._agents, self._tokens = agents, tokens
        self._held = 0  # ids in all entries
        self._lock = threading.Lock()

    def convert(self, name: str, tokens) -> np.ndarray:
        """`tokens` as uint32 ids, as kvstore.cache.keys.tokens_to_array converts them (read-only), reading
        only the items a list added since agent `name`'s last conversion when it extends that list."""
        if type(tokens) is not list or not tokens or type(tokens[0]) is not int or type(tokens[-1]) is not int:
            return tokens_to_array(tokens)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry()
            self._entries.move_to_end(name)
            if entry.kept is not None:
                ids = self._extended(entry, tokens)
                if ids is not None:
                    entry.backoff = 0
                    self._trim()
                    return ids
                # A miss: this list and the next `backoff` ones are converted whole and not kept.
                self._held -= entry.size
                entry.kept = entry.ids = entry.keyed = None
                entry.backoff = min(MAX_BACKOFF, entry.backoff * 2 or 1)
                entry.skip = entry.backoff
                return tokens_to_array(tokens)
            ids = tokens_to_array(tokens)
            if entry.skip:
                entry.skip -= 1
            elif len(tokens) <= self._tokens:
                ids.setflags(write=False)
                entry.kept, entry.ids = [*tokens, _ABOVE], ids
                self._held += len(tokens)
            self._trim()
            return ids

    def chunk_keys(self, name: str, fingerprint: str, ids: np.ndarray, chunk_size: int) -> list[bytes]:
        """kvstore.cache.keys.chunk_keys of `ids`, the array `convert` returned for agent `name`: the keys of
        the whole chunks it shares with the ids last keyed for that agent are not hashed again."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.ids is not ids:
                return chunk_keys(fingerprint, ids, chunk_size)
            whole = ids.size // chunk_size
            same = entry.keyed is not None and entry.keyed[:2] == (fingerprint, chunk_size)
            keys = chunk_keys(fingerprint, ids, chunk_size, known=entry.keyed[2][:whole] if same else ())
            entry.keyed = (fingerprint, chunk_size, keys[:whole])
            return keys

    def _extended(self, entry: _Entry, tokens: list) -> np.ndarray | None:
        """The ids of `tokens` if it extends the entry's list by plain ints (the entry then holds it), else None."""
        kept, kept_ids, n = entry.kept, entry.ids, entry.size
        if kept is None or kept_ids is None or len(tokens) <= n:
            return None
        # A list made again (a server tokenizes each request's whole prompt) holds other int objects:
        # comparing those by value would cost three conversions. Some items are looked at first.
        if any(tokens[i] is not kept[i] for i in range(0, n, max(1, n // SAMPLES))) or tokens[n - 1] is not kept[n - 1]:
            return None
        added = tokens[n:]
        try:
            kept[n] = _BELOW
            if not kept < tokens:
                return None
            kept[n] = _ABOVE
            if not tokens < kept or any(type(t) is not int for t in added):
                return None
            new = np.frombuffer(array.array(U32_CODE, added), dtype=np.uint32)
        except Exception:  # items that do not compare with ints, or ids past uint32: converted whole
            return None
        finally:
            kept[n] = _ABOVE
        ids = np.concatenate((kept_ids, new))
        ids.setflags(write=False)
        del kept[n:]
        kept.extend(added)
        kept.append(_ABOVE)
        entry.ids = ids  # (its keys of whole chunks stay those of the ids it extends)
        self._held += len(added)
        return ids

    def _trim(self) -> None:
        while self._entries and (len(self._entries) > self._agents or self._held > self._tokens):
            _name, entry = self._entries.popitem(last=False)
            self._held -= entry.size
