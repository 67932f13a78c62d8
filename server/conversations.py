"""Which conversation a request continues, the turn itself, and what the cache did for it.

Clients of an OpenAI-style API send the whole conversation every time and name nothing. A
request continues a stored conversation when that conversation's last prompt is a prefix of the
new prompt (matched by hash, in memory and, after a restart, from the records in the store);
otherwise it starts a new anonymous one, whose cache still starts from the longest prefix any
conversation has, in memory or in the store. The `X-Kvstore-Agent` header names a conversation
instead; an OpenAI `prompt_cache_key` (or `user`) puts new conversations in that namespace (and a
request continues only a conversation of its own namespace). Runs on the model thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import xxhash

from kvstore.agents import Agent, AgentManager, GenerationOptions, Reply
from kvstore.agents import turn as turn_mod
from kvstore.agents.turn import TurnState
from kvstore.errors import UnknownAgentError
from kvstore.names import validate_name
from kvstore.ops.save import utc_day

from . import metrics
from .budget import DiskBudget, index_bytes, is_conversation
from .miss import MissExplainer, TurnFacts, messages_digests
from .retention import ANONYMOUS, MARK, Pin, cache_creation, conversation_mark, merge_pins, new_name, pinned_until
from .worker import Job

log = logging.getLogger("kvstore.server")
__all__ = ["ANONYMOUS", "TurnRequest", "TurnResult", "Conversations"]
STATS_ROWS = 100  # /v1/cache/stats lists the most recently used conversations, this many
KEEP_MISSES = 64  # a conversation's record keeps the last few turns' miss explanations (kvstore explain)


def prompt_hash(tokens) -> str:
    return xxhash.xxh3_128_hexdigest(np.asarray(tokens, dtype="<u4").tobytes())


@dataclass
class TurnRequest:
    """A rendered request: its prompt tokens, the conversation it records, and how to generate."""

    prompt: list[int]
    messages: list[dict]
    options: GenerationOptions
    conversation: str | None = None  # X-Kvstore-Agent
    arrived: float = field(default_factory=time.perf_counter)
    kind: str = "chat"  # for the log line: chat | completion | messages
    namespace: str | None = None  # prompt_cache_key / user: new conversations go in this namespace
    pins: list[Pin] = field(default_factory=list)  # cache_control breakpoints (Anthropic)
    first_index: int = 0  # the API's index of template message 0 (-1 when it is Anthropic's system)


@dataclass
class TurnResult:
    conversation: str
    reply: Reply
    prompt_tokens: int
    cached_ram: int  # prompt tokens from a cache in memory
    cached_disk: int  # prompt tokens restored from the store
    prefilled: int
    ttft: float  # seconds from the request's arrival to the first token
    stopped_by: str | None = None  # the stop string that ended the reply
    miss: dict | None = None  # why the uncached tokens were not cached (server.miss)
    bytes_written: int = 0  # blob bytes this turn's save wrote
    pins: list[Pin] = field(default_factory=list)
    pinned_over_budget: bool = False  # pins alone hold the store over --max-disk

    @property
    def cached(self) -> int:
        return self.cached_ram + self.cached_disk

    @property
    def cache_creation(self) -> tuple[int, int, int]:
        """(cache_creation_input_tokens, 5m part, 1h part), as Anthropic's API counts them."""
        return cache_creation(self.pins, self.cached)

    def usage_detail(self) -> dict:
        """kvstore's own account of the turn, the `kvstore` field of both APIs' usage."""
        return {
            "cached_ram_tokens": self.cached_ram,
            "cached_disk_tokens": self.cached_disk,
            "prefilled_tokens": self.prefilled,
            "conversation": self.conversation,
            "ttft": self.ttft,
            "bytes_written": self.bytes_written,
            "pinned_tokens": max((p.tokens for p in self.pins), default=0),
            "miss": self.miss,
        }


@dataclass
class Counters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_ram_tokens: int = 0
    cached_disk_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    bytes_written: int = 0

    def as_dict(self) -> dict:
        p = self.prompt_tokens or 1
        return dict(
            self.__dict__,
            hit_rate=round((self.cached_ram_tokens + self.cached_disk_tokens) / p, 4),
            ram_hit_rate=round(self.cached_ram_tokens / p, 4),
            disk_hit_rate=round(self.cached_disk_tokens / p, 4),
        )


def _digest_entries(mark: dict) -> dict[str, int | None]:
    """A conversation's entries in the miss explainer's MessageIndex: its messages (they covered its last
    prompt) and its system prompt."""
    out: dict[str, int | None] = {}
    if mark.get("system_digest"):
        out[mark["system_digest"]] = None
    if mark.get("messages_digest") and mark.get("prompt_tokens"):
        out[mark["messages_digest"]] = int(mark["prompt_tokens"])
    return out


def conversation_row(info) -> dict:
    """A conversation as /v1/cache/stats lists it: its class, namespace, pins and bytes written."""
    mark = conversation_mark(info.meta) or {}
    return {
        "name": info.name,
        "anonymous": bool(mark.get("anonymous")),
        "namespace": mark.get("namespace"),
        "tokens": info.n_tokens,
        "bytes_written": int(mark.get("bytes_written", 0)),
        "pinned_until": pinned_until(info.meta) or None,
        "updated": info.updated,
    }


@dataclass
class Began:
    """A turn's conversation as it began: the agent, the tokens it had, and a conversation it meant to
    continue that was deleted behind the server's back (for the miss explanation)."""

    agent: Agent
    before: list[int]
    vanished: tuple[str, int] | None


class Conversations:
    """The server's conversations of one model: the prompt index, turns, lookups, stats and clearing."""

    def __init__(self, manager: AgentManager, budget: DiskBudget):
        self.manager = manager
        self.store = manager.store
        self.budget = budget
        self.counters = Counters()
        self.explainer = MissExplainer(manager)
        budget.on_drop = self._dropped
        # (last prompt length, its hash, namespace) -> conversation
        self._by_prompt: dict[tuple[int, str, str | None], str] = {}
        self._key_of: dict[str, tuple[int, str, str | None]] = {}
        self._namespace: dict[str, str | None] = {}
        for info in self.store.agents():
            if is_conversation(info, manager.fingerprints):
                mark = conversation_mark(info.meta)
                self._namespace[info.name] = mark.get("namespace")
                if mark.get("prompt_tokens"):
                    self._index(info.name, (int(mark["prompt_tokens"]), mark["prompt_hash"]))
                self.explainer.messages.add(info.name, _digest_entries(mark))

    def _index(self, name: str, key: tuple[int, str] | None) -> None:
        old = self._key_of.pop(name, None)
        if old is not None and self._by_prompt.get(old) == name:
            del self._by_prompt[old]
        if key is not None:
            full = (*key, self._namespace.get(name))
            self._by_prompt[full] = name
            self._key_of[name] = full

    def _forget(self, name: str) -> None:
        self._index(name, None)
        self._namespace.pop(name, None)
        self.explainer.messages.forget(name)

    def _dropped(self, info, cause: str) -> None:
        """A conversation the budget is about to delete: remembered, so a later miss can say so."""
        mgr = self.manager
        try:
            tokens = mgr.get(info.name).tokens if mgr.is_resident(info.name) else self.store.tokens(info.name)
        except UnknownAgentError:
            tokens = []
        self.explainer.graveyard.bury(info.name, cause, tokens)
        self._forget(info.name)

    def _continued(self, prompt: list[int], namespace: str | None = None) -> tuple[str, int] | None:
        """(conversation, its prompt length) whose last prompt is the longest prefix of `prompt`, in the
        request's namespace."""
        arr = np.asarray(prompt, dtype="<u4")
        for n in sorted({n for n, _h, ns in self._by_prompt if n <= len(prompt) and ns == namespace}, reverse=True):
            name = self._by_prompt.get((n, prompt_hash(arr[:n]), namespace))
            if name is not None:
                return name, n
        return None

    def agent_for(
        self, prompt: list[int], named: str | None, namespace: str | None = None
    ) -> tuple[Agent, tuple[str, int] | None]:
        """The conversation a request continues, or a new one; and a continued one deleted behind our back."""
        mgr = self.manager
        if named is not None:
            validate_name(named, "X-Kvstore-Agent")
            try:
                return mgr.get(named), None  # a name of another model's agent raises ModelMismatchError
            except UnknownAgentError:
                self._namespace[named] = namespace
                return mgr.create(named, None, meta={MARK: {"anonymous": False, "namespace": namespace}}), None
        vanished = None
        found = self._continued(prompt, namespace)
        if found is not None:
            try:
                return mgr.get(found[0]), None
            except UnknownAgentError:  # removed behind our back (kvstore rm): start afresh
                self._forget(found[0])
                vanished = found
        name = new_name(namespace)
        self._namespace[name] = namespace
        mark = {"anonymous": namespace is None, "namespace": namespace}
        return mgr.create(name, None, meta={MARK: mark}), vanished

    def target(self, req: TurnRequest) -> str | None:
        """The conversation a request would continue now (None: a new one); the batch serializes on it."""
        if req.conversation is not None:
            return req.conversation
        found = self._continued(req.prompt, req.namespace)
        return found[0] if found is not None else None

    def begin(self, req: TurnRequest, job: Job) -> Began:
        """The conversation a turn continues, its prompt indexed for the next request that extends it."""
        self.budget.check_floor()
        agent, vanished = self.agent_for(req.prompt, req.conversation, req.namespace)
        before = list(agent.tokens)
        key = (len(req.prompt), prompt_hash(req.prompt))
        mark = dict(agent.meta.get(MARK) or {}, prompt_tokens=key[0], prompt_hash=key[1])
        if req.pins:
            merge_pins(mark, req.pins, self.budget.clock())
        agent.meta[MARK] = mark
        self._index(agent.name, key)
        if job.cancelled.is_set():
            raise ConnectionAbortedError("the client went away before its turn started")
        return Began(agent, before, vanished)

    def explain(self, req: TurnRequest, began: Began, state: TurnState) -> dict:
        """Why the prompt's uncached part missed (usage.kvstore.miss), once the turn knows what it reused."""
        return self.explainer.explain(
            TurnFacts(
                prompt=req.prompt,
                messages=req.messages if req.kind != "completion" else None,
                tools=req.options.tools,
                template_kwargs=req.options.chat_template_kwargs,
                first_index=req.first_index,
                cached=state.reused + state.restored,
                conversation=began.agent.name,
                before=began.before,
                vanished=began.vanished,
            )
        )

    def run(self, req: TurnRequest, job: Job) -> TurnResult:
        """One turn alone: prefill what no cache has, stream the reply as "delta" events, save, keep the budget."""
        began = self.begin(req, job)
        # As rendered: the same request gets the same reply whether or not its conversation is cached.
        stream = began.agent.respond(req.prompt, req.messages, req.options, stream=True, own_ids=False)
        miss = None
        for segment in stream:
            if job.cancelled.is_set():
                stream.close()  # the turn keeps (and saves) what was computed
                break
            job.emit("delta", segment)
            if miss is None:  # after the first token is out: explaining never delays it
                miss = self.explain(req, began, stream.state)
        return self.finish(req, began, stream.state, miss)

    def finish(self, req: TurnRequest, began: Began, state: TurnState, miss: dict | None = None) -> TurnResult:
        """A finished (saved) turn's result: its miss explained, counters, the log line, the disk budget."""
        agent, name = began.agent, began.agent.name
        reply = state.reply
        if reply is None:  # deleted (kvstore rm, /clear) while it generated
            raise ConnectionAbortedError(f"the conversation {name!r} was deleted during its turn")
        if miss is None:
            miss = self.explain(req, began, state)
        st = reply.stats
        first = state.first or time.perf_counter()
        result = TurnResult(
            conversation=name,
            reply=reply,
            prompt_tokens=st.prompt_tokens,
            cached_ram=st.reused_tokens,
            cached_disk=st.restored_tokens,
            prefilled=st.prefilled_tokens,
            ttft=round(first - req.arrived, 6),
            stopped_by=state.stopped_by,
            miss=miss,
            bytes_written=st.bytes_saved,
            pins=req.pins,
        )
        c = self.counters
        c.requests += 1
        c.prompt_tokens += st.prompt_tokens
        c.cached_ram_tokens += st.reused_tokens
        c.cached_disk_tokens += st.restored_tokens
        c.prefilled_tokens += st.prefilled_tokens
        c.generated_tokens += st.generated_tokens
        c.bytes_written += st.bytes_saved
        log.debug(  # the request's line (request_log.py) says the same, with the status and duration
            "%s %s: prompt %d, cached %d (ram %d, disk %d), prefilled %d, generated %d, ttft %.3fs, miss %s, "
            "wrote %d bytes%s",
            req.kind,
            name,
            st.prompt_tokens,
            result.cached,
            st.reused_tokens,
            st.restored_tokens,
            st.prefilled_tokens,
            st.generated_tokens,
            result.ttft,
            miss["reason"],
            st.bytes_saved,
            ", interrupted" if reply.finish_reason == "interrupted" else "",
        )
        self._record(agent, req, miss, st.bytes_saved)
        result.pinned_over_budget = self.after_turn(name, self._namespace.get(name))
        return result

    def _record(self, agent: Agent, req: TurnRequest, miss: dict, bytes_written: int) -> None:
        """The turn's miss explanation, messages digests and bytes written, in the conversation's record."""
        mark = dict(agent.meta[MARK])
        mark["bytes_written"] = int(mark.get("bytes_written", 0)) + bytes_written
        turn = int(mark.get("turn_count", 0)) + 1  # 1-based, never reused (the record keeps the last turns only)
        mark["turn_count"] = turn
        mark["misses"] = [*(mark.get("misses") or [])[-(KEEP_MISSES - 1) :], dict(miss, turn=turn)]
        # A new meta dict: the manager's last-written record shares the old one, and compares equal to it.
        agent.meta = dict(agent.meta, **{MARK: mark})
        if req.kind != "completion":
            recorded = agent.conversation(req.messages)  # the request's messages (the reply apart)...
            digests = messages_digests([*recorded, agent.messages[-1]])  # ...and the reply
            mark["messages_digest"] = digests[-1]
            mark["system_digest"] = digests[0] if recorded and recorded[0].get("role") == "system" else None
            self.explainer.messages.add(agent.name, _digest_entries(mark))
        if not self.store.readonly and not self.manager.writes_paused:
            self.manager.save(agent.name)  # the record only: its KV was saved with the turn

    def after_turn(self, name: str, namespace: str | None = None) -> bool:
        """Keep the disk budget and forget the records of conversations no longer in memory; True while
        pins alone hold the store over --max-disk."""
        if not self.budget.check_floor():
            dropped = self.budget.enforce(protect=frozenset([name]) | self.manager.busy, namespace=namespace)
            metrics.count_evictions(len(dropped))
        self.manager.release_idle(keep=name)
        return self.budget.pinned_over_budget

    def lookup(self, prompt: list[int]) -> dict:
        """Where a prompt's tokens would come from now: memory, the store, or a prefill."""
        limit = len(prompt) - 1
        mgr = self.manager
        ram = max((min(turn_mod.common_prefix(mgr.get(n).tokens, prompt), limit) for n in mgr.resident()), default=0)
        disk = mgr.stored_prefix(prompt[:limit]) if limit > 0 else 0
        from_ram, from_disk = (ram, 0) if ram >= disk else (0, disk)
        return {
            "prompt_tokens": len(prompt),
            "ram_tokens": from_ram,
            "disk_tokens": from_disk,
            "prefill_tokens": len(prompt) - from_ram - from_disk,
            "continues": (self._continued(prompt) or (None,))[0],
        }

    def conversations(self) -> list:
        return [a for a in self.store.agents() if is_conversation(a, self.manager.fingerprints)]

    def stats(self) -> dict:
        mgr = self.manager
        convs = self.conversations()
        store = self.store.stats()
        report = mgr.memory_report()
        b = self.budget
        return {
            "model": mgr.handle.name,
            "fingerprint": mgr.fingerprint,
            "entries": len(convs),
            "tokens": sum(a.n_tokens for a in convs),
            "bytes_on_disk": store.bytes_on_disk,
            "bytes_in_ram": report.caches_bytes,
            "resident": {n: report.cache_tokens[n] for n in report.caches},
            "since_start": self.counters.as_dict(),
            "store": {
                "path": store.path,
                "agents": store.agents,
                "chunks": store.chunks,
                "blobs": store.blobs,
                "dedup_ratio": store.dedup_ratio,
                "chunk_size": store.chunk_size,
            },
            "disk": {
                "max_disk": b.max_disk,
                "used_bytes": b.used(),
                "index_bytes": index_bytes(self.store),
                "free_bytes": b.free_bytes(),
                "min_free_disk": b.min_free,
                "writes_paused": b.writes_paused,
                "conversations_dropped": b.dropped,
                "dropped_by": dict(b.dropped_by),
                "anon_ttl": b.anon_ttl,
                "namespace_quota": b.namespace_quota,
                "pinned_over_budget": b.pinned_over_budget,
            },
            "writes": {
                "today": b.written_today(),
                "by_day": self.store.writes_by_day(),
                "max_writes_per_day": b.max_writes_per_day,
                "limit_reached": b.write_limit_hit == utc_day(b.clock()),
                "since_start": self.counters.bytes_written,
            },
            "conversations": [conversation_row(a) for a in sorted(convs, key=lambda a: -a.updated)[:STATS_ROWS]],
        }

    def clear(self) -> dict:
        """Delete every conversation of this model and collect their blobs."""
        infos = self.conversations()
        names = [a.name for a in infos]
        for info in infos:
            self._dropped(info, "cleared")
            self.manager.delete(info.name)
        # Retention for this server's conversations only: other agents of the store keep every snapshot.
        report = self.store.gc(keep_last=1, agents=names) if names and not self.store.readonly else None
        return {"deleted": len(names), "bytes_freed": report.bytes_freed if report else 0}
