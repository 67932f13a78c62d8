"""Which conversation a request continues, the turn itself, and what the cache did for it.

Clients of an OpenAI-style API send the whole conversation every time and name nothing. A
request continues a stored conversation when that conversation's last prompt is a prefix of the
new prompt (matched by hash, in memory and, after a restart, from the records in the store);
otherwise it starts a new anonymous one, whose cache still starts from the longest prefix any
conversation has, in memory or in the store. The `X-Kvstore-Agent` header names a conversation
instead. Runs on the model thread only.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import xxhash

from kvstore.agents import Agent, AgentManager, GenerationOptions, Reply
from kvstore.agents import turn as turn_mod
from kvstore.agents.turn import TurnState
from kvstore.errors import UnknownAgentError
from kvstore.names import validate_name

from .budget import MARK, DiskBudget, is_conversation
from .worker import Job

log = logging.getLogger("kvstore.server")
ANONYMOUS = "anon:"  # the reserved name prefix of conversations no header named


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

    @property
    def cached(self) -> int:
        return self.cached_ram + self.cached_disk

    def usage_detail(self) -> dict:
        """kvstore's own account of the turn, the `kvstore` field of both APIs' usage."""
        return {
            "cached_ram_tokens": self.cached_ram,
            "cached_disk_tokens": self.cached_disk,
            "prefilled_tokens": self.prefilled,
            "conversation": self.conversation,
            "ttft": self.ttft,
        }


@dataclass
class Counters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_ram_tokens: int = 0
    cached_disk_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict:
        p = self.prompt_tokens or 1
        return dict(
            self.__dict__,
            hit_rate=round((self.cached_ram_tokens + self.cached_disk_tokens) / p, 4),
            ram_hit_rate=round(self.cached_ram_tokens / p, 4),
            disk_hit_rate=round(self.cached_disk_tokens / p, 4),
        )


class Conversations:
    """The server's conversations of one model: the prompt index, turns, lookups, stats and clearing."""

    def __init__(self, manager: AgentManager, budget: DiskBudget):
        self.manager = manager
        self.store = manager.store
        self.budget = budget
        self.counters = Counters()
        self._by_prompt: dict[tuple[int, str], str] = {}  # (last prompt length, its hash) -> conversation
        self._key_of: dict[str, tuple[int, str]] = {}
        for info in self.store.agents():
            if is_conversation(info, manager.fingerprint):
                mark = info.meta["meta"][MARK]
                if mark.get("prompt_tokens"):
                    self._index(info.name, (int(mark["prompt_tokens"]), mark["prompt_hash"]))

    def _index(self, name: str, key: tuple[int, str] | None) -> None:
        old = self._key_of.pop(name, None)
        if old is not None and self._by_prompt.get(old) == name:
            del self._by_prompt[old]
        if key is not None:
            self._by_prompt[key] = name
            self._key_of[name] = key

    def _continued(self, prompt: list[int]) -> str | None:
        """The conversation whose last prompt is the longest prefix of `prompt`, if any."""
        arr = np.asarray(prompt, dtype="<u4")
        for n in sorted({n for n, _ in self._by_prompt if n <= len(prompt)}, reverse=True):
            name = self._by_prompt.get((n, prompt_hash(arr[:n])))
            if name is not None:
                return name
        return None

    def agent_for(self, prompt: list[int], named: str | None) -> Agent:
        """The conversation a request continues, or a new one."""
        mgr = self.manager
        if named is not None:
            validate_name(named, "X-Kvstore-Agent")
            try:
                return mgr.get(named)  # a name of another model's agent raises ModelMismatchError
            except UnknownAgentError:
                return mgr.create(named, None, meta={MARK: {"anonymous": False}})
        name = self._continued(prompt)
        if name is not None:
            try:
                return mgr.get(name)
            except UnknownAgentError:  # removed behind our back (kvstore rm): start afresh
                self._index(name, None)
        return mgr.create(ANONYMOUS + uuid.uuid4().hex[:16], None, meta={MARK: {"anonymous": True}})

    def target(self, req: TurnRequest) -> str | None:
        """The conversation a request would continue now (None: a new one); the batch serializes on it."""
        return req.conversation if req.conversation is not None else self._continued(req.prompt)

    def begin(self, req: TurnRequest, job: Job) -> Agent:
        """The conversation a turn continues, its prompt indexed for the next request that extends it."""
        self.budget.check_floor()
        agent = self.agent_for(req.prompt, req.conversation)
        key = (len(req.prompt), prompt_hash(req.prompt))
        agent.meta[MARK] = dict(agent.meta.get(MARK) or {}, prompt_tokens=key[0], prompt_hash=key[1])
        self._index(agent.name, key)
        if job.cancelled.is_set():
            raise ConnectionAbortedError("the client went away before its turn started")
        return agent

    def run(self, req: TurnRequest, job: Job) -> TurnResult:
        """One turn alone: prefill what no cache has, stream the reply as "delta" events, save, keep the budget."""
        agent = self.begin(req, job)
        stream = agent.respond(req.prompt, req.messages, req.options, stream=True)
        for segment in stream:
            if job.cancelled.is_set():
                stream.close()  # the turn keeps (and saves) what was computed
                break
            job.emit("delta", segment)
        return self.finish(req, agent.name, stream.state)

    def finish(self, req: TurnRequest, name: str, state: TurnState) -> TurnResult:
        """A finished (saved) turn's result: counters, the log line, the disk budget."""
        reply = state.reply
        if reply is None:  # deleted (kvstore rm, /clear) while it generated
            raise ConnectionAbortedError(f"the conversation {name!r} was deleted during its turn")
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
        )
        c = self.counters
        c.requests += 1
        c.prompt_tokens += st.prompt_tokens
        c.cached_ram_tokens += st.reused_tokens
        c.cached_disk_tokens += st.restored_tokens
        c.prefilled_tokens += st.prefilled_tokens
        c.generated_tokens += st.generated_tokens
        log.info(
            "%s %s: prompt %d, cached %d (ram %d, disk %d), prefilled %d, generated %d, ttft %.3fs%s",
            req.kind,
            name,
            st.prompt_tokens,
            result.cached,
            st.reused_tokens,
            st.restored_tokens,
            st.prefilled_tokens,
            st.generated_tokens,
            result.ttft,
            ", client went away" if reply.finish_reason == "interrupted" else "",
        )
        self.after_turn(name)
        return result

    def after_turn(self, name: str) -> None:
        """Keep the disk budget and forget the records of conversations no longer in memory."""
        if not self.budget.check_floor():
            for gone in self.budget.enforce(protect=frozenset([name]) | self.manager.busy):
                self._index(gone, None)
        self.manager.release_idle(keep=name)

    def lookup(self, prompt: list[int]) -> dict:
        """Where a prompt's tokens would come from now: memory, the store, or a prefill."""
        limit = len(prompt) - 1
        mgr = self.manager
        ram = max((min(turn_mod.common_prefix(mgr.get(n).tokens, prompt), limit) for n in mgr.resident()), default=0)
        disk = self.store.match(prompt[:limit], model=mgr.fingerprint).n_tokens if limit > 0 else 0
        from_ram, from_disk = (ram, 0) if ram >= disk else (0, disk)
        return {
            "prompt_tokens": len(prompt),
            "ram_tokens": from_ram,
            "disk_tokens": from_disk,
            "prefill_tokens": len(prompt) - from_ram - from_disk,
            "continues": self._continued(prompt),
        }

    def conversations(self) -> list:
        return [a for a in self.store.agents() if is_conversation(a, self.manager.fingerprint)]

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
                "free_bytes": b.free_bytes(),
                "min_free_disk": b.min_free,
                "writes_paused": b.writes_paused,
                "conversations_dropped": b.dropped,
            },
        }

    def clear(self) -> dict:
        """Delete every conversation of this model and collect their blobs."""
        names = [a.name for a in self.conversations()]
        for name in names:
            self.manager.delete(name)
            self._index(name, None)
        report = self.store.gc(keep_last=1) if names and not self.store.readonly else None
        return {"deleted": len(names), "bytes_freed": report.bytes_freed if report else 0}
