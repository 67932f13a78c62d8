"""Which agents' caches stay in memory: at most `max_resident`, within an optional byte budget, the least
recently used evicted first, never one in a turn (`busy`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import ItemsView, Iterator, ValuesView
from dataclasses import dataclass

from kvstore.cache.capture import Capture
from kvstore.cache.leaves import cache_nbytes


@dataclass
class Resident:
    """An agent's cache in memory: what it has seen is `Agent.tokens`."""

    cache: list
    capture: Capture | None  # sliding-window chunks and state checkpoints taken during prefill, until the next save
    dirty: bool = False  # holds tokens the store does not

    def nbytes(self) -> int:
        return cache_nbytes(self.cache) + (self.capture.nbytes() if self.capture else 0)


class Residency:
    """The resident caches by agent name, least recently used first, and the rule that picks what to evict.

    The manager evicts: it saves a dirty cache before it drops it (`AgentManager._drop`).
    """

    def __init__(self, max_resident: int, max_resident_bytes: int | None):
        if max_resident < 0:
            raise ValueError("max_resident must be 0 or more")
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self.busy: set[str] = set()  # agents in a turn on the server's batch: never evicted meanwhile
        self._caches: OrderedDict[str, Resident] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._caches

    def __getitem__(self, name: str) -> Resident:
        return self._caches[name]

    def __setitem__(self, name: str, res: Resident) -> None:
        """Add a cache (a new one is the most recently used)."""
        self._caches[name] = res

    def __delitem__(self, name: str) -> None:
        del self._caches[name]

    def __iter__(self) -> Iterator[str]:
        """Names, least recently used first."""
        return iter(self._caches)

    def __len__(self) -> int:
        return len(self._caches)

    def get(self, name: str) -> Resident | None:
        return self._caches.get(name)

    def pop(self, name: str) -> Resident | None:
        """Forget a cache without saving it (None when it was not in memory)."""
        return self._caches.pop(name, None)

    def items(self) -> ItemsView[str, Resident]:
        return self._caches.items()

    def values(self) -> ValuesView[Resident]:
        return self._caches.values()

    def clear(self) -> None:
        self._caches.clear()

    def touch(self, name: str) -> None:
        """Mark a cache as the most recently used."""
        self._caches.move_to_end(name)

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self._caches.values())

    def next_victim(self, protect: str | None = None) -> str | None:
        """The cache to evict next while there are more than max_resident or they take more than
        max_resident_bytes; None when they fit. The least recently used goes first; `protect` (the agent
        in use) only when max_resident is 0, and a busy agent never."""
        budget = self.max_resident_bytes
        if not self._caches or (len(self._caches) <= self.max_resident and (budget is None or self.nbytes() <= budget)):
            return None
        victims = [n for n in self._caches if n != protect and n not in self.busy]
        if victims:
            return victims[0]
        if self.max_resident > 0 or protect is None:
            return None  # the agent in use stays, even over the byte budget
        return protect
