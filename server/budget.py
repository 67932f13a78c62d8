"""The server's disk budget: which conversations go when the store is over its bytes, and in what order.

Order (a policy as data: `EVICTION_ORDER`): anonymous conversations idle past `--anon-ttl` go at any
time; a namespace over `--namespace-quota` loses its own least recently used conversations; then, while
the store (blobs and index) is over `--max-disk`, anonymous conversations go before named ones, least
recently used first. A conversation holding a client's pin (`cache_control`) within its ttl is never
dropped, nor the conversation of the turn in progress, nor any agent the server did not create.
Dropping a conversation removes its snapshots only; the engine's gc then removes the chunks no kept
snapshot references, so a chunk that a kept conversation needs is never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.index import wal
from kvstore.index.location import INDEX_FILE

from .retention import MARK, conversation_mark, is_anonymous, namespace_of, pinned_until

if TYPE_CHECKING:
    from kvstore import Store
    from kvstore.agents import AgentManager
    from kvstore.records import AgentInfo

log = logging.getLogger("kvstore.server")
__all__ = ["MARK", "DiskBudget", "Dropped", "default_max_disk", "is_conversation", "index_bytes"]

# The default --max-disk: a quarter of the disk's free space when the server starts, at most 30 GiB
# (LM Studio's mlx-engine takes min(30 GiB, free / 4) for its prompt cache; oMLX and llama.cpp have
# no default bound, and their users report 83 GB and 503 GB caches).
DEFAULT_MAX_DISK_CAP = 30 << 30
DEFAULT_MAX_DISK_SHARE = 4
DEFAULT_ANON_TTL = 24 * 3600.0  # seconds an anonymous conversation survives without a turn
HOUSEKEEPING_SECONDS = 60.0  # expiry and head-only trimming run at most this often (a quarter of a shorter
# --anon-ttl), and whenever the store is over budget
EVICTION_ORDER = ("anonymous", "named")  # under pressure, least recently used first within each class


def default_max_disk(free_bytes: int) -> int:
    """--max-disk when none is given: min(30 GiB, a quarter of the free disk)."""
    return min(DEFAULT_MAX_DISK_CAP, free_bytes // DEFAULT_MAX_DISK_SHARE)


def is_conversation(info, fingerprints: tuple[str, ...]) -> bool:
    """Whether a stored agent is one of this model's server conversations (`fingerprints`: the manager's)."""
    return info.model in fingerprints and conversation_mark(info.meta) is not None


def index_bytes(store: Store) -> int:
    """Bytes of a folder store's SQLite index (its WAL and shared-memory files too); 0 for a database URL."""
    if not str(store.url).startswith("sqlite"):
        return 0
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(store.path / (INDEX_FILE + suffix)).st_size
        except OSError:
            pass
    return total


@dataclass(frozen=True)
class Dropped:
    """A conversation the budget removed, and why: budget | anon_ttl | namespace_quota."""

    name: str
    cause: str


class DiskBudget:
    """Keeps the store (blobs and index) under `max_disk`, and stops writes below `min_free` free bytes
    or past `max_writes_per_day` bytes written today."""

    def __init__(
        self,
        store: Store,
        manager: AgentManager,
        max_disk: int | None,
        min_free: int,
        *,
        anon_ttl: float | None = DEFAULT_ANON_TTL,
        namespace_quota: int | None = None,
        max_writes_per_day: int | None = None,
        on_drop: Callable[[AgentInfo, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.manager = manager
        self.max_disk = max_disk
        self.min_free = min_free
        self.anon_ttl = anon_ttl
        self.namespace_quota = namespace_quota
        self.max_writes_per_day = max_writes_per_day
        self.on_drop = on_drop  # told about each conversation before it is deleted (the miss explainer)
        self.clock = clock
        self.writes_paused = False
        self.floor_paused = False
        self.write_limit_hit: str | None = None  # the UTC day whose write limit was reached
        self.pinned_over_budget = False  # pins alone keep the store over max_disk
        self.dropped = 0  # conversations dropped since start
        self.dropped_by: dict[str, int] = {}
        self._last_housekeeping = float("-inf")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.store.path).free

    def written_today(self) -> int:
        from kvstore.ops.save import utc_day

        return self.store.writes_by_day().get(utc_day(self.clock()), 0)

    def check_floor(self) -> bool:
        """Pause or resume writes by the free space and today's writes; True while writes are paused."""
        free = self.free_bytes()
        floor = free < self.min_free
        if floor != self.floor_paused:
            if floor:
                log.warning(
                    "only %d bytes free on the store's disk (floor %d): not writing caches until there "
                    "is room; serving goes on",
                    free,
                    self.min_free,
                )
            else:
                log.warning("%d bytes free on the store's disk again: writing caches", free)
        self.floor_paused = floor
        limited = False
        if self.max_writes_per_day is not None:
            from kvstore.ops.save import utc_day

            day = utc_day(self.clock())
            limited = self.written_today() >= self.max_writes_per_day
            if limited and self.write_limit_hit != day:
                self.write_limit_hit = day  # warn once a day
                log.warning(
                    "%d bytes written to the store today (UTC %s): --max-writes-per-day %d reached; caches stay "
                    "in memory only until tomorrow (serving goes on)",
                    self.written_today(),
                    day,
                    self.max_writes_per_day,
                )
        self.writes_paused = self.manager.writes_paused = floor or limited
        return self.writes_paused

    def used(self) -> int:
        """What --max-disk counts: the blob bytes the index records, and the index itself."""
        return self.store.stats().bytes_on_disk + index_bytes(self.store)

    def _excess(self) -> int:
        """Bytes the store is over --max-disk (0: within it, or no budget). A SQLite index's WAL keeps its
        high-water mark until a checkpoint truncates it, and every eviction's deletes append to it: when
        the store looks over, the WAL is truncated first, so that an eviction's own log is not counted as
        data to evict for."""
        if self.max_disk is None or self.used() <= self.max_disk:
            return 0
        try:
            wal.checkpoint(self.store.engine, truncate=True)
        except Exception:  # noqa: BLE001 - best effort: a busy reader keeps the WAL, counted as it is
            log.debug("disk budget: could not checkpoint the index's WAL", exc_info=True)
        return max(0, self.used() - self.max_disk)

    def _conversations(self) -> list[AgentInfo]:
        fp = self.manager.fingerprints
        return [a for a in self.store.agents() if is_conversation(a, fp)]

    def _drop(self, info: AgentInfo, cause: str) -> None:
        if self.on_drop is not None:
            self.on_drop(info, cause)
        self.manager.delete(info.name)
        self.dropped += 1
        self.dropped_by[cause] = self.dropped_by.get(cause, 0) + 1

    def _collect(self, conversations: list[AgentInfo]) -> None:
        """Anonymous conversations keep only their head; every kept conversation's superseded snapshots go
        too while the store is over budget; then the engine's gc removes what nothing references."""
        names = [a.name for a in conversations if is_anonymous(a.meta)]
        if self.max_disk is not None and self.used() > self.max_disk:
            names = [a.name for a in conversations]
        self.store.gc(keep_last=1, agents=names, grace=3600.0)

    def enforce(
        self, protect: frozenset[str] = frozenset(), *, force: bool = False, namespace: str | None = None
    ) -> list[Dropped]:
        """Expire, apply the namespace quotas and the disk budget; returns the conversations dropped.

        `namespace` is the one the turn just written belongs to: between housekeeping runs only its
        quota can have been crossed.
        """
        if self.store.readonly:
            return []
        now = self.clock()
        over = self._excess() > 0
        every = HOUSEKEEPING_SECONDS if self.anon_ttl is None else min(HOUSEKEEPING_SECONDS, self.anon_ttl / 4)
        due = force or now - self._last_housekeeping >= every
        quota = self.namespace_quota is not None and (due or namespace is not None)
        if not over and not due and not quota:
            return []
        conversations = self._conversations()
        out: list[Dropped] = []

        def keep(info: AgentInfo) -> bool:
            return info.name in protect or pinned_until(info.meta) > now

        if due:
            self._last_housekeeping = now
            if self.anon_ttl is not None:
                for info in conversations:
                    if is_anonymous(info.meta) and now - info.updated > self.anon_ttl and not keep(info):
                        self._drop(info, "anon_ttl")
                        out.append(Dropped(info.name, "anon_ttl"))
        if quota:
            left = [a for a in conversations if a.name not in {d.name for d in out}]
            out += self._namespace_quotas(left, keep, None if due else namespace)
        conversations = [a for a in conversations if a.name not in {d.name for d in out}]
        rank = {kind: i for i, kind in enumerate(EVICTION_ORDER)}
        victims = sorted(
            (a for a in conversations if not keep(a)),
            key=lambda a: (rank["anonymous" if is_anonymous(a.meta) else "named"], a.updated, a.name),
        )
        if out or (due and not over) or (over and not victims):  # (else the drops below collect)
            self._collect(conversations)
        excess = self._excess()
        if excess > 0:
            while victims and excess > 0:
                # Drop as many as their unique bytes say it takes, then collect once (a gc per drop
                # cost 0.15 s each); chunks shared among the dropped ones count for none, so look again.
                while victims and excess > 0:
                    info = victims.pop(0)
                    excess -= self.store.agent_bytes(info.name)[info.name].unique_bytes
                    self._drop(info, "budget")
                    out.append(Dropped(info.name, "budget"))
                gone = {d.name for d in out}
                self.store.gc(keep_last=1, agents=[a.name for a in conversations if a.name not in gone])
                excess = self._excess()
            self._report(conversations, {d.name for d in out}, now)
        elif self.pinned_over_budget:
            self.pinned_over_budget = False
        if out:
            log.info("disk budget: dropped %d conversation(s); store now %d bytes", len(out), self.used())
        return out

    def _namespace_quotas(self, conversations: list[AgentInfo], keep, only: str | None) -> list[Dropped]:
        """Each namespace (prompt_cache_key / user; or just `only`) over its quota loses its least recently
        used conversations."""
        groups: dict[str, list[AgentInfo]] = {}
        for info in conversations:
            ns = namespace_of(info.meta)
            if ns is not None and (only is None or ns == only):
                groups.setdefault(ns, []).append(info)
        out: list[Dropped] = []
        for ns, members in groups.items():
            sizes = {m.name: self.store.agent_bytes(m.name)[m.name].total_bytes for m in members}
            total = sum(sizes.values())
            for info in sorted(members, key=lambda a: (a.updated, a.name)):
                if total <= self.namespace_quota:
                    break
                if keep(info):
                    continue
                self._drop(info, "namespace_quota")
                out.append(Dropped(info.name, "namespace_quota"))
                total -= sizes.get(info.name, 0)
            if total > self.namespace_quota:
                log.warning(
                    "namespace %r: %d bytes over its quota %d are pinned or in use", ns, total, self.namespace_quota
                )
        return out

    def _report(self, conversations: list[AgentInfo], gone: set[str], now: float) -> None:
        used = self.used()
        if used <= self.max_disk:
            self.pinned_over_budget = False
            return
        pinned = [a.name for a in conversations if a.name not in gone and pinned_until(a.meta) > now]
        was = self.pinned_over_budget
        self.pinned_over_budget = bool(pinned)
        if pinned and not was:
            log.warning(
                "disk budget: the store holds %d bytes, over --max-disk %d, and %d pinned conversation(s) "
                "(cache_control within its ttl) cannot be dropped: the pins alone exceed the budget",
                used,
                self.max_disk,
                len(pinned),
            )
        elif not pinned:
            log.warning(
                "disk budget: %d bytes are still over --max-disk %d (the conversation in use and other agents' "
                "caches need them)",
                used,
                self.max_disk,
            )
