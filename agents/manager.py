"""AgentManager: persistent agents on one mlx-lm model, their turns and their saves.

Which caches stay in memory is agents/residency.py; where a cache not in memory comes from, agents/sourcing.py.
"""

from __future__ import annotations

import builtins  # the annotations of AgentManager, whose `list` method hides the built-in in its body
import copy
import time
import warnings
from collections.abc import Callable, Generator
from typing import Any

from kvstore import Store
from kvstore.cache.capture import Capture
from kvstore.cache.leaves import cache_tokens
from kvstore.errors import AgentExistsError, BlobError, ModelMismatchError, UnknownAgentError
from kvstore.names import validate_name
from kvstore.ops import restore
from kvstore.records import AgentInfo, Snapshot

from . import kv as kvq
from . import memory, turn
from .agent import Agent
from .model import resolve_model
from .records import GenerationOptions, MemoryReport, Reply, TurnStats
from .residency import Residency, Resident
from .sourcing import CacheSource, CutRule
from .turn import TurnState


class RecoveryWarning(UserWarning):
    """A damaged or missing blob was recomputed from the agent's token history."""


class AgentManager:
    """Agents of one model, their caches in memory (at most `max_resident`) and in the store.

    Args:
        model: a model folder, a Hugging Face id, or a `(model, tokenizer)` pair from `mlx_lm.load`.
        store: an open `kvstore.Store`.
        max_resident: caches kept in memory; the least recently used is saved, then evicted.
        max_resident_bytes: also evict while the resident caches take more bytes than this.
        autosave: save after every turn (only the chunks the store lacks are written).
        prefill_step: tokens per prefill step (rounded to a multiple of the store's chunk size).
        progress: called as progress(agent name, done, total) during long prefills.
        share_resident: a new agent (or one whose cache is not in memory) starts from a copy of
            another resident cache when that shares more of its prompt than the store has (the
            server uses this; agents then report those tokens as reused, not restored).
        kv_bits, kv_group_size, quantized_kv_start: KV-cache quantization as in mlx-lm's generate
            (kv_bits None: full precision); caches are keyed by these settings too (agents/kv.py).
    """

    def __init__(
        self,
        model: Any,
        store: Store,
        max_resident: int = 3,
        max_resident_bytes: int | None = None,
        *,
        autosave: bool = True,
        prefill_step: int = 512,
        progress: Callable[[str, int, int], None] | None = None,
        share_resident: bool = False,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = kvq.DEFAULT_QUANTIZED_KV_START,
    ):
        self._resident = Residency(max_resident, max_resident_bytes)  # checks max_resident first
        self.kv = kvq.settings(kv_bits, kv_group_size, quantized_kv_start)
        self.handle = resolve_model(model)
        self.store = store
        self._keys = kvq.CacheKeys(self.handle, store, self.kv)
        self.fingerprint = self._keys.primary
        self.fingerprints = self._keys.all  # with kv_bits: the quantized caches' first, then the others
        self.autosave = autosave and not store.readonly
        chunk = store.chunk_size
        self.prefill_step = max(chunk, prefill_step // chunk * chunk)
        self.progress = progress
        self.share_resident = share_resident
        self.writes_paused = False  # set by a caller that must not write (the server, below its free-disk floor)
        fresh = self.handle.make_cache()
        kinds = Capture.kinds(fresh)
        self._captures = bool(kinds & {"rot", "state"})  # sliding-window chunks or state checkpoints to take
        self._states = "state" in kinds  # recurrent state: never trimmed, restored only at a checkpoint
        # A sliding window this long or longer can no longer be trimmed; a recurrent state never can.
        self._source = CacheSource(store, self._keys, CutRule(states=self._states, window=turn.min_window(fresh)))
        self._agents: dict[str, Agent] = {}
        self._stored: dict[str, dict] = {}  # each agent's record as last written to the store

    @property
    def max_resident(self) -> int:
        return self._resident.max_resident

    @property
    def max_resident_bytes(self) -> int | None:
        return self._resident.max_resident_bytes

    @property
    def busy(self) -> set[str]:
        """Agents in a turn on the server's batch: never evicted meanwhile."""
        return self._resident.busy

    def __repr__(self) -> str:
        return f"<AgentManager model={self.handle.name!r} agents={len(self._agents)} resident={list(self._resident)}>"

    def __enter__(self) -> AgentManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model(self):
        return self.handle.model

    @property
    def tokenizer(self):
        return self.handle.tokenizer

    # -- agents ------------------------------------------------------------------------------

    def create(self, name: str, system_prompt: str | None = None, meta: dict | None = None) -> Agent:
        """A new agent with a role; its record is stored at once (a new process can `get` it)."""
        validate_name(name)
        if name in self._agents or self._exists(name):
            raise AgentExistsError(f"an agent named {name!r} already exists: get() it, or delete() it first")
        agent = Agent(self, name, system_prompt, meta=meta)
        fresh = self._keys.new_cache()
        self.store.save(name, fresh, [], model=self._keys.of(fresh), meta=agent.record())
        self._stored[name] = agent.record()
        self._agents[name] = agent
        return agent

    def get(self, name: str) -> Agent:
        """The agent `name`, from memory or from the store's record (its cache loads on its next turn)."""
        agent = self._agents.get(name)
        if agent is not None:
            return agent
        validate_name(name)
        model, record, tokens = restore.head(self.store, name)  # one query: this is on every resume's path
        if model not in self.fingerprints:
            raise ModelMismatchError(
                f"agent {name!r} belongs to model {model}; this manager runs {self.handle.name} ({self.fingerprint})"
            )
        agent = Agent.from_record(self, name, record, tokens)
        self._stored[name] = record
        self._agents[name] = agent
        return agent

    def load(self, name: str) -> Agent:
        """The agent with its cache in memory now (from the store; recomputed where blobs are damaged)."""
        agent = self.get(name)
        if name in self._resident:
            self._resident.touch(name)
            return agent
        history = list(agent.tokens)
        errors: list[BlobError] = []
        res, restored, copied = self._materialize(agent, history, len(history), errors)
        n = restored + copied
        turn.prefill(
            self.model, res.cache, history, n, len(history), self.prefill_step, res.capture, self._progress_for(name)
        )
        agent.tokens = history
        res.dirty = n < len(history)
        if errors:
            self._warn_recovered(name, errors)
        if res.dirty and self.autosave:
            self._save(name)
        self._evict(protect=name)
        return agent

    def save(self, name: str) -> Snapshot | None:
        """Write the agent's new chunks and record to the store; None when there was nothing to write."""
        if name not in self._agents:
            self.get(name)
        return self._save(name)

    def save_all(self) -> list[Snapshot]:
        """Save every agent that holds unsaved tokens."""
        return [s for s in (self._save(n) for n in list(self._agents)) if s is not None]

    def delete(self, name: str) -> bool:
        """Forget an agent in memory and in the store. False if the store did not have it."""
        validate_name(name)
        self._resident.pop(name)
        self._agents.pop(name, None)
        self._stored.pop(name, None)
        return self.store.delete(name)

    def release(self, name: str) -> None:
        """Forget an agent in memory (its unsaved tokens saved first); the store keeps it for a later `get`."""
        if name in self._resident:
            self._drop(name)
        agent = self._agents.pop(name, None)
        stored = self._stored.pop(name, None)
        if agent is not None and stored != agent.record() and not self.store.readonly and not self.writes_paused:
            self.store.set_meta(name, agent.record())

    def discard_resident(self, name: str, tokens: list[int]) -> None:
        """Forget an agent's cache without saving it (a turn failed with it in an unknown state);
        `tokens` is what the agent had seen before that turn."""
        self._resident.pop(name)
        if name in self._agents:
            self._agents[name].tokens = list(tokens)

    def release_idle(self, keep: str | None = None) -> None:
        """Forget every agent whose cache is not in memory (but `keep`): a long-running server's bound."""
        for name in [n for n in self._agents if n != keep and n not in self._resident]:
            self.release(name)

    def fork(self, name: str, new_name: str) -> Agent:
        """A copy of `name` as `new_name`: it shares every stored chunk, and a resident cache is copied."""
        src = self.get(name)
        validate_name(new_name)
        if new_name in self._agents:
            raise AgentExistsError(f"an agent named {new_name!r} already exists")
        self._save(name)
        self.store.fork(name, new_name)
        tokens = self.store.tokens(new_name)
        agent = Agent(
            self,
            new_name,
            src.system_prompt,
            copy.deepcopy(src.messages),
            tokens,
            copy.deepcopy(src.meta),
            copy.deepcopy(src.turns),
        )
        self._stored[new_name] = self.store.agent(new_name).meta
        self._agents[new_name] = agent
        res = self._resident.get(name)
        if res is not None and tokens == src.tokens and self.max_resident > 0:
            # New arrays: a turn on the fork must never write into the original's buffers.
            self._resident[new_name] = Resident(turn.copy_cache(res.cache), self._new_capture())
            self._evict(protect=new_name)
        return agent

    def list(self) -> list[AgentInfo]:
        """The store's agents that belong to this manager's model."""
        return [a for a in self.store.agents() if a.model in self.fingerprints]

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self) -> builtins.list[str]:
        """Names of the agents whose caches are in memory, least recently used first."""
        return list(self._resident)

    def memory_report(self) -> MemoryReport:
        """Model bytes, each resident cache's bytes and tokens, and the process's footprint."""
        rss, peak = memory.process_rss()
        active, mlx_peak = memory.mlx_memory()
        return MemoryReport(
            model_bytes=self.handle.nbytes,
            caches={n: r.nbytes() for n, r in self._resident.items()},
            cache_tokens={n: len(self._agents[n].tokens) for n in self._resident},
            rss_bytes=rss,
            peak_rss_bytes=peak,
            mlx_active_bytes=active,
            mlx_peak_bytes=mlx_peak,
        )

    def close(self) -> None:
        """Save what is unsaved and release the resident caches."""
        if not self.store.readonly:
            self.save_all()
        self._resident.clear()

    # -- internals ---------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        try:
            self.store.agent(name)
        except UnknownAgentError:
            return False
        return True

    def _new_capture(self) -> Capture | None:
        """What a resident cache captures while it prefills (None when there is nothing to capture)."""
        if not self._captures:
            return None
        return Capture(self.store.chunk_size, turn_ends=self.tokenizer.eos_token_ids, states=self._states)

    def stored_prefix(self, tokens: builtins.list[int]) -> int:
        """Tokens of the longest prefix of `tokens` the store can restore for this manager."""
        return self._keys.stored_prefix(tokens)

    def _progress_for(self, name: str):
        if self.progress is None:
            return None
        return lambda done, total: self.progress(name, done, total)

    def _save(self, name: str) -> Snapshot | None:
        if self.writes_paused:
            return None  # the cache stays dirty: a later save (writes resumed) writes it
        res = self._resident.get(name)
        agent = self._agents[name]
        record = agent.record()
        if res is None or not res.dirty:
            if self._stored.get(name) != record:  # only the record changed (e.g. the caller's meta)
                self.store.set_meta(name, record)
                self._stored[name] = record
            return None
        fp = self._keys.of(res.cache)
        snap = self.store.save(
            name,
            res.cache,
            agent.tokens,
            model=fp,
            meta=record,
            captured=res.capture.pieces if res.capture else None,
            moves_from=[f for f in self.fingerprints if f != fp],
        )
        self._stored[name] = record
        res.dirty = False
        if res.capture:
            res.capture.pieces.clear()  # stored now; later saves find these chunks in the index
        return snap

    def _drop(self, name: str) -> None:
        """Take a cache out of memory, saving it first when it holds unsaved tokens."""
        if self._resident[name].dirty and not self.store.readonly:
            self._save(name)  # (lost while writes are paused: the record keeps the last saved state)
        del self._resident[name]

    def _evict(self, protect: str | None = None) -> None:
        """Evict least recently used caches past max_resident or max_resident_bytes (agents/residency.py)."""
        while (victim := self._resident.next_victim(protect)) is not None:
            self._drop(victim)

    def _warn_recovered(self, name: str, errors: builtins.list[BlobError]) -> None:
        fix = "repaired the store" if self.autosave else "the next save repairs the store"
        warnings.warn(
            f"agent {name!r}: {len(errors)} damaged or missing blob(s) ({errors[0]}); recomputed its "
            f"KV from the token history and {fix}",
            RecoveryWarning,
            stacklevel=4,
        )

    def _materialize(
        self, agent: Agent, target: builtins.list[int], limit: int, errors: builtins.list[BlobError]
    ) -> tuple[Resident, int, int]:
        """A new resident cache holding the longest known prefix of target[:limit] (agents/sourcing.py).

        Returns (it, tokens restored from the store, tokens copied from another resident cache);
        damaged blobs met on the way are appended to `errors`.
        """
        own = agent.tokens
        keep = min(turn.common_prefix(own, target), limit)
        cache = self._source.own(agent.name, own, keep, errors)
        n, copied = (keep if cache is not None else 0), 0
        if cache is None and self.share_resident and self._resident:
            others = [(self._agents[o].tokens, self._resident[o].cache) for o in self._resident if o != agent.name]
            donated = self._source.donor(target, limit, self.stored_prefix(target[:limit]), others)
            if donated is not None:
                cache, copied = donated
        if cache is None:
            cache, n = self._source.restore(target, limit, errors)
        if cache is None:
            cache, n = self._keys.new_cache(), 0
        agent.tokens = list(target[: n + copied])
        res = Resident(cache, self._new_capture())
        self._resident[agent.name] = res
        return res, n, copied

    def start_turn(
        self,
        agent: Agent,
        prompt: builtins.list[int],
        messages: builtins.list[dict],
        options: GenerationOptions,
        *,
        own_ids: bool = True,
    ) -> tuple[Generator[str, None, None], TurnState]:
        """A turn on an already rendered prompt: (text segments, its TurnState; `.reply` once finished).

        `messages` is the conversation the agent records once the reply is appended (the system
        prompt apart). Agent.chat renders the template itself; the server renders full requests.
        `own_ids`: a recurrent-state model's agent continuing its own conversation continues the ids
        it generated (turn.continue_exactly); False answers `prompt` as rendered, which the server
        needs: its reply must be a function of the request alone, cached or not (issue 25's
        differential walk found replies that changed with the cache's state).
        """
        if not prompt:
            raise ValueError("the prompt is empty")
        if agent.manager is not self:
            raise ValueError(f"agent {agent.name!r} belongs to another manager")
        if own_ids and self._states and agent.messages and messages[: len(agent.messages)] == agent.messages:
            # The agent's own conversation, continued: a recurrent state cannot be cut back into a
            # reply that re-tokenized differently, so the turn continues the ids the cache has seen.
            prompt = turn.continue_exactly(self.tokenizer.eos_token_ids, agent.tokens, list(prompt))
        state = TurnState(prompt=list(prompt), messages=list(messages), options=options)
        return self._turn(agent, state), state

    def begin_turn(self, agent: Agent, state: TurnState) -> Resident:
        """The first half of a turn: the agent's cache holding the longest known prefix of the prompt.

        Sets state.reused / state.restored; the caller prefills the rest (up to the prompt's last
        token), generates, then calls `end_turn`. A failure leaves no cache in an unknown state.
        """
        name = agent.name
        prompt = state.prompt
        limit = len(prompt) - 1  # the last prompt token is fed by the generator
        before = list(agent.tokens)
        try:
            res = self._resident.get(name)
            if res is not None:
                keep = min(turn.common_prefix(agent.tokens, prompt), limit)
                if keep > 0 and turn.trim_to(res.cache, len(agent.tokens), keep):
                    agent.tokens = agent.tokens[:keep]
                    if res.capture:
                        res.capture.drop_from(keep)
                    state.reused = keep
                else:  # nothing in common, or a rotated sliding window: start from the store
                    self._drop(name)
                    res = None
            if res is None:
                tr = time.perf_counter()
                res, state.restored, state.reused = self._materialize(agent, prompt, limit, state.errors)
                state.restore_seconds = time.perf_counter() - tr
            self._resident.touch(name)
        except BaseException:
            self._resident.pop(name)  # a cache in an unknown state is never used again
            agent.tokens = before
            raise
        return res

    def end_turn(self, agent: Agent, res: Resident, state: TurnState, cache: builtins.list | None = None) -> None:
        """The second half of a turn: record what the cache has seen, save, set state.reply.

        `cache` replaces the resident one when the turn generated into another (the server's
        batch hands back each conversation's own cache). Nothing is recorded for a cache that was
        dropped meanwhile (the agent keeps its last saved state).
        """
        if agent.name not in self._resident or self._resident[agent.name] is not res:
            return
        if cache is not None:
            res.cache = cache
        self._finish_turn(agent, res, state)

    def _turn(self, agent: Agent, state: TurnState) -> Generator[str, None, None]:
        """One chat turn as a generator of text segments; sets state.reply when it ends."""
        name = agent.name
        prompt = state.prompt
        limit = len(prompt) - 1
        before = list(agent.tokens)
        res = self.begin_turn(agent, state)
        try:
            tp = time.perf_counter()
            done = state.reused + state.restored
            progress = self._progress_for(name)
            turn.prefill(
                self.model, res.cache, prompt, done, limit, self.prefill_step, res.capture, progress, kv=self.kv
            )
            state.prefill_seconds = time.perf_counter() - tp
            segments = turn.generate(
                self.model, self.tokenizer, res.cache, prompt[limit:], state, res.capture, limit, kv=self.kv
            )
        except BaseException:
            self._resident.pop(name)  # a cache in an unknown state is never used again
            agent.tokens = before
            raise
        try:
            yield from segments
        except GeneratorExit:
            segments.close()
            state.finish = "interrupted"
            raise
        except BaseException:
            self._resident.pop(name)
            agent.tokens = before
            raise
        finally:
            if name in self._resident:
                self._finish_turn(agent, res, state)

    def _finish_turn(self, agent: Agent, res: Resident, state: TurnState) -> None:
        name = agent.name
        prompt, generated = state.prompt, state.tokens
        history = prompt + generated
        seen = cache_tokens(res.cache, default=len(history))  # a pure recurrent model has seen all of it
        if seen > len(history):  # cannot happen with mlx-lm's generate_step; never trust such a cache
            del self._resident[name]
            seen = len(prompt)
        agent.tokens = history[:seen]
        agent.messages = state.messages + [{"role": "assistant", "content": state.text}]
        res.dirty = True
        now = time.perf_counter()
        first = state.first or now
        n_gen = len(generated)
        tps = (n_gen - 1) / (now - first) if n_gen > 1 and now > first else 0.0
        reused, restored = state.reused, state.restored
        stats = TurnStats(
            prompt_tokens=len(prompt),
            reused_tokens=reused,
            restored_tokens=restored,
            prefilled_tokens=len(prompt) - reused - restored,
            generated_tokens=n_gen,
            ttft=round(first - state.t0, 6),
            tokens_per_second=round(tps, 3),
            restore_seconds=round(state.restore_seconds, 6),
            prefill_seconds=round(state.prefill_seconds, 6),
            source="resident" if reused else "store" if restored else "cold",
            recovered=bool(state.errors),
        )
        agent.turns.append(stats.as_dict())
        if state.errors:
            self._warn_recovered(name, state.errors)
        if self.autosave and name in self._resident:
            ts = time.perf_counter()
            snap = self._save(name)
            stats = TurnStats(
                **dict(
                    stats.as_dict(),
                    save_seconds=round(time.perf_counter() - ts, 6),
                    bytes_saved=snap.bytes_written if snap else 0,
                )
            )
            agent.turns[-1] = stats.as_dict()
        self._evict(protect=name)
        state.reply = Reply(
            text=state.text, tokens=tuple(generated), stats=stats, finish_reason=state.finish, agent=name
        )
