"""One request's turn on the decode batch: its cache, its prefill in steps, its tokens as text, its save.

The same turn as `Conversations.run` (AgentManager.begin_turn / end_turn around it), cut into
the pieces the scheduler interleaves with other requests: `begin`, `prefill_step` until the
prompt is in, then `take` for each token the batch samples for it, then `finish`. Runs on the
model thread only.
"""

from __future__ import annotations

import time
from typing import Any

from kvstore.agents import Agent
from kvstore.agents import turn as turn_mod
from kvstore.agents.turn import TurnState

from .batch import Row
from .conversations import Began, Conversations, TurnRequest, TurnResult
from .worker import Job

__all__ = ["BatchTurn"]


class BatchTurn:
    """A turn between `begin` and `finish`: where its prompt stands, and the reply so far."""

    def __init__(self, conversations: Conversations, req: TurnRequest, job: Job):
        self.conversations = conversations
        self.manager = conversations.manager
        self.req = req
        self.job = job
        self.state = TurnState(prompt=list(req.prompt), messages=list(req.messages), options=req.options)
        self.agent: Agent | None = None
        self.began: Began | None = None
        self.res: Any = None  # the agent's resident cache (the manager's _Resident)
        self.fed = 0  # prompt tokens in the cache so far
        self._start = 0  # prompt tokens the cache held when the turn began (reused or restored)
        self.miss: dict | None = None  # why the uncached part missed, explained before the save
        self.closing = False  # the reply is finished; the batch feeds its last token, then it leaves
        self._before: list[int] = []  # the agent's tokens before this turn (restored if it fails)
        tok = self.manager.tokenizer
        self._eos = set(tok.eos_token_ids)
        self._detok = tok.detokenizer  # a fresh streaming detokenizer per access
        self._scan = turn_mod.StopScan(req.options.stop)

    @property
    def limit(self) -> int:
        """Prompt tokens the cache takes before decoding (the last one is the batch's first input)."""
        return len(self.state.prompt) - 1

    def begin(self) -> None:
        """Find the conversation and its cache (resident, a resident donor, the store, or nothing)."""
        if not self.state.prompt:
            raise ValueError("the prompt is empty")
        mgr = self.manager
        self.began = self.conversations.begin(self.req, self.job)
        self.agent = self.began.agent
        self._before = list(self.agent.tokens)
        self.res = mgr.begin_turn(self.agent, self.state)
        mgr.busy.add(self.agent.name)
        self.fed = self._start = self.state.reused + self.state.restored

    def prefill_step(self) -> bool:
        """Prefill up to the next step boundary; True once the prompt (but its last token) is in."""
        mgr = self.manager
        if self.fed < self.limit:
            t0 = time.perf_counter()
            stop = min(self.limit, (self.fed // mgr.prefill_step + 1) * mgr.prefill_step)
            turn_mod.prefill(mgr.model, self.res.cache, self.state.prompt, self.fed, stop, mgr.prefill_step, None)
            self.fed = stop
            # The agent's tokens follow its cache: another request may copy this cache as a donor.
            self.agent.tokens = self.state.prompt[: self.fed]
            self.state.prefill_seconds += time.perf_counter() - t0
            if mgr.progress is not None:  # a long prefill's progress in the log (server/request_log.py)
                mgr.progress(self.agent.name, self.fed - self._start, self.limit - self._start)
        return self.fed >= self.limit

    def row(self) -> Row:
        """How this turn samples in the batch; its first input is the prompt's last token."""
        self.state.tokens, self.state.text, self.state.finish = [], "", "length"
        return Row.for_options(self.req.options, self.state.prompt[-1])

    def take(self, token: int) -> bool:
        """A token the batch sampled: emit its text; True when the turn is finished (as turn.generate)."""
        st = self.state
        if st.first is None:
            st.first = time.perf_counter()
        st.tokens.append(token)
        if token in self._eos:
            st.finish = "stop"
            return True
        self._detok.add_token(token)
        segment = self._scan.feed(self._detok.last_segment)
        if segment:
            st.text += segment
            self.job.emit("delta", segment)
        if self.miss is None:  # once the first token is out, before the save stores this very prompt
            self.miss = self.conversations.explain(self.req, self.began, st)
        if self._scan.hit:
            st.finish, st.stopped_by = "stop", self._scan.hit
            return True
        return len(st.tokens) >= st.options.max_tokens

    def finish(self, cache: list | None, interrupted: bool = False) -> TurnResult:
        """End the turn with the cache the batch handed back: flush the text, save, count."""
        st = self.state
        if not self._scan.hit:
            self._detok.finalize()
            tail = self._scan.feed(self._detok.last_segment)
            tail += "" if self._scan.hit else self._scan.flush()
            if self._scan.hit:
                st.finish, st.stopped_by = "stop", self._scan.hit
            st.text += tail
            if tail and not interrupted:
                self.job.emit("delta", tail)
        if interrupted:
            st.finish = "interrupted"
        if self.miss is None:
            self.miss = self.conversations.explain(self.req, self.began, st)
        try:
            self.manager.end_turn(self.agent, self.res, st, cache)
        finally:
            self.release()
        return self.conversations.finish(self.req, self.began, st, self.miss)

    def fail(self) -> None:
        """Forget a turn that failed midway: its cache is in an unknown state and is never used again."""
        if self.agent is not None:
            self.manager.discard_resident(self.agent.name, self._before)
        self.release()

    def release(self) -> None:
        if self.agent is not None:
            self.manager.busy.discard(self.agent.name)
