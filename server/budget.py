"""The server's disk budget: least recently used conversations go first, then the engine's gc collects."""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore import Store
    from kvstore.agents import AgentManager

log = logging.getLogger("kvstore.server")
MARK = "kvstore_serve"  # the agent meta key that marks a server conversation


def is_conversation(info, fingerprints: tuple[str, ...]) -> bool:
    """Whether a stored agent is one of this model's server conversations (`fingerprints`: the manager's)."""
    meta = (info.meta or {}).get("meta") or {}
    return info.model in fingerprints and isinstance(meta, dict) and MARK in meta


class DiskBudget:
    """Keeps the store's blob bytes under `max_disk` and stops writes below `min_free` free bytes.

    Dropping a conversation removes its snapshots only; the engine's gc then removes the chunks
    no kept snapshot references, so a chunk that a kept conversation needs is never deleted.
    """

    def __init__(self, store: Store, manager: AgentManager, max_disk: int | None, min_free: int):
        self.store = store
        self.manager = manager
        self.max_disk = max_disk
        self.min_free = min_free
        self.writes_paused = False
        self.dropped = 0  # conversations dropped to keep the budget, since start

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.store.path).free

    def check_floor(self) -> bool:
        """Pause or resume writes by the free space on the store's disk; True while writes are paused."""
        free = self.free_bytes()
        paused = free < self.min_free
        if paused != self.writes_paused:
            if paused:
                log.warning(
                    "only %d bytes free on the store's disk (floor %d): not writing caches until there "
                    "is room; serving goes on",
                    free,
                    self.min_free,
                )
            else:
                log.warning("%d bytes free on the store's disk again: writing caches", free)
        self.writes_paused = self.manager.writes_paused = paused
        return paused

    def used(self) -> int:
        return self.store.stats().bytes_on_disk

    def enforce(self, protect: frozenset[str] = frozenset()) -> list[str]:
        """Drop least recently used conversations until the blobs fit; returns the names dropped."""
        if self.max_disk is None or self.store.readonly or self.used() <= self.max_disk:
            return []
        fp = self.manager.fingerprints
        conversations = [a for a in self.store.agents() if is_conversation(a, fp)]
        # First the conversations' superseded snapshots; other agents in the store keep all of theirs.
        self.store.gc(keep_last=1, agents=[a.name for a in conversations])
        if self.used() <= self.max_disk:
            return []
        victims = sorted((a for a in conversations if a.name not in protect), key=lambda a: (a.updated, a.name))
        dropped: list[str] = []
        for info in victims:
            self.manager.delete(info.name)
            dropped.append(info.name)
            self.store.gc(keep_last=1, agents=[a.name for a in conversations])
            if self.used() <= self.max_disk:
                break
        self.dropped += len(dropped)
        used = self.used()
        log.info("disk budget: dropped %d conversation(s); blobs now %d bytes of %d", len(dropped), used, self.max_disk)
        if used > self.max_disk:
            log.warning(
                "disk budget: %d bytes of blobs are still over --max-disk %d (the conversations in use "
                "and other agents' caches need them)",
                used,
                self.max_disk,
            )
        return dropped
