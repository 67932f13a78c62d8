"""Where a cache that is not in memory comes from: the agent's own snapshot, a copy of another resident cache,
the longest prefix the store can restore, else an empty cache (AgentManager._materialize tries them in that order).

Damaged blobs met on the way are discarded (the next save writes that KV again) and reported; the caller
recomputes what they held from the token history.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvstore import Store
from kvstore.errors import BlobError

from . import kv as kvq
from . import turn

MAX_DISCARDS = 64  # damaged blobs one restore may discard before it gives up and prefills from scratch


@dataclass(frozen=True, slots=True)
class CutRule:
    """Whether a cache that has seen `have` tokens can be cut back to its first `keep`: never a recurrent
    state, and a sliding window only while it has not wrapped."""

    states: bool  # the model keeps recurrent state (never trimmed)
    window: int | None  # its smallest sliding window (None: every layer holds everything)

    def allows(self, have: int, keep: int) -> bool:
        if keep == have:
            return True
        if self.states:
            return False
        return self.window is None or have < self.window


class CacheSource:
    """The sources of a cache for one manager's agents, in the store and among the resident caches."""

    def __init__(self, store: Store, keys: kvq.CacheKeys, cut: CutRule):
        self.store = store
        self.keys = keys
        self.cut = cut

    def own(self, name: str, own: list[int], keep: int, errors: list[BlobError]) -> list | None:
        """The agent's own snapshot, which has seen `own`, trimmed to its first `keep` tokens; None when
        it cannot be (another process saved this agent since, a window that wrapped, a damaged blob).

        The very cache an uninterrupted process would hold: a resumed conversation computes the same tokens.
        """
        if keep <= 0 or not self.cut.allows(len(own), keep):
            return None
        try:
            cache, toks = self.keys.load(name)
        except BlobError as e:
            self.damaged(errors, e)
            return None
        if toks == own and turn.trim_to(cache, len(own), keep):
            return cache
        return None  # another process saved this agent since: use only what matches our prompt

    def donor(
        self, target: list[int], limit: int, at_least: int, residents: Iterable[tuple[list[int], list]]
    ) -> tuple[list, int] | None:
        """A copy of the resident cache (given as (tokens it has seen, cache), least recently used first)
        holding the most of target[:limit], more than `at_least` tokens; None when none does.

        Conversations that share a prefix (a system prompt, a document) with one in memory start
        from a copy of it instead of the store: a RAM copy is faster than a restore. Less than a
        chunk in common is not worth a copy of the whole cache.
        """
        best, best_n = None, max(at_least, self.store.chunk_size - 1)
        for own, cache in residents:
            n = min(turn.common_prefix(own, target), limit)
            if n > best_n and self.cut.allows(len(own), n):
                best, best_n = (own, cache), n
        if best is None:
            return None
        copied = turn.copy_cache(best[1])
        if not turn.trim_to(copied, len(best[0]), best_n):
            return None
        return copied, best_n

    def restore(self, target: list[int], limit: int, errors: list[BlobError]) -> tuple[list | None, int]:
        """The longest prefix of target[:limit] the store can restore and its length, discarding damaged
        blobs as it meets them (at most MAX_DISCARDS); (None, 0) when it has none or gives up."""
        for _ in range(MAX_DISCARDS):
            try:
                return self.store.restore(target, model=self.keys.richest(target[:limit]), max_tokens=limit)
            except BlobError as e:
                self.damaged(errors, e)
                if not e.blob_id or self.store.readonly:
                    break  # nothing was discarded, so another restore would fail the same way
        return None, 0

    def damaged(self, errors: list[BlobError], e: BlobError) -> None:
        """Report a damaged blob, and discard it: the next save writes this KV again."""
        errors.append(e)
        if e.blob_id and not self.store.readonly:
            self.store.discard_blob(e.blob_id)
