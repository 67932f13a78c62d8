"""The model thread, batching turns: concurrent requests decode together, new ones join between steps.

Each pass of the loop: take what arrived (turns wait in arrival order; other jobs, lookups and
stats, run at once), end the turns whose client went away (their slot is free that instant, what
was computed is saved), admit waiting turns up to `max_concurrency` (a turn waits while another
turn of the same conversation runs), prefill one step of the oldest admitted prompt, then one
decode step of every conversation in the batch. A turn whose reply is finished leaves the batch
after the next step (which feeds its last token) with its own cache, is saved, and only then
answered: every returned turn is durable.

Requests beyond `max_concurrency` wait in the queue (no 429): a client sees keep-alives until its
turn starts. A model whose cache the batch cannot hold (sliding-window, quantized, recurrent
layers) and one-token prompts run alone, one at a time, as the plain Worker runs them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import deque
from typing import Any

from .batch import DecodeBatch, batchable
from .batch_turn import BatchTurn
from .config import DEFAULT_MAX_CONCURRENCY
from .conversations import Conversations, TurnRequest
from .worker import Job, Worker

__all__ = ["Scheduler", "TurnJob"]

log = logging.getLogger("kvstore.server")


class TurnJob(Job):
    """A job that is a chat turn: the scheduler may run it in the batch instead of calling `fn`."""

    turn: TurnRequest


class Scheduler(Worker):
    """A Worker whose turns (`submit_turn`) are generated together; `attach` it to the conversations first."""

    def __init__(self, max_concurrency: int = DEFAULT_MAX_CONCURRENCY, name: str = "kvstore-model"):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.conversations: Conversations | None = None
        self.batched = False  # whether this model's turns can share a batch
        self._waiting: deque[TurnJob] = deque()
        self._prefilling: list[BatchTurn] = []
        self._decoding: list[BatchTurn] = []  # in the batch's row order
        self._batch: DecodeBatch | None = None
        self._stopping = False
        super().__init__(name)

    def attach(self, conversations: Conversations) -> None:
        """Serve turns of these conversations (call on the model thread, once the model is loaded)."""
        self.conversations = conversations
        handle = conversations.manager.handle
        # KV quantization (--kv-bits) changes a cache mid-turn (agents/kv.py): such turns run alone.
        self.batched = batchable(handle.make_cache()) and conversations.manager.kv is None
        self._batch = DecodeBatch(handle.model)
        if not self.batched:
            log.info("this model's cache cannot be batched: turns run one at a time")

    def submit_turn(self, turn: TurnRequest, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a turn; its events ("delta", then "done" or "error") go to the job's queue."""
        job = TurnJob(lambda job: self.conversations.run(turn, job), loop)
        job.turn = turn
        with self._lock:
            self._pending.append(job)
        self._queue.put(job)
        return job

    def active(self) -> int:
        """Turns admitted: prefilling or decoding."""
        return len(self._prefilling) + len(self._decoding)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            plain = self._take()
            try:
                self._drop_cancelled()
                for job in plain:
                    self._run(job)
                if self._stopping and not self.active() and not self._waiting:
                    return
                self._admit()
                if self._prefilling:
                    self._prefill_one()
                if self._decoding:
                    self._decode_step()
            except Exception as e:  # a bug here must not take the model thread down with every request
                log.exception("model thread: %s", e)
                self._fail_active(e)

    def _fail_active(self, e: BaseException) -> None:
        """Fail every admitted turn (their caches are in an unknown state) and start a new batch."""
        turns, self._prefilling, self._decoding = self._prefilling + self._decoding, [], []
        self._batch = DecodeBatch(self._batch.model)
        for t in turns:
            t.fail()
            self._failed(t.job, e)

    def _take(self) -> list[Job]:
        """What arrived: turns go to the waiting line, the other jobs are returned to run now."""
        plain: list[Job] = []
        block = not (self.active() or self._waiting or self._stopping)
        while True:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return plain
            block = False
            if job is None:
                self._stopping = True
            elif isinstance(job, TurnJob):
                self._waiting.append(job)
            else:
                plain.append(job)

    def _run(self, job: Job) -> None:
        """A job on its own, to the end (as the plain Worker runs every job)."""
        try:
            result = job.fn(job)
        except BaseException as e:
            self._failed(job, e)
        else:
            self._done(job, result)

    def _done(self, job: Job, result: Any) -> None:
        job.emit("done", result)
        job.future.set_result(result)
        self._forget(job)

    def _failed(self, job: Job, e: BaseException) -> None:
        if not isinstance(e, Exception):
            log.exception("model thread: %s", e)
        job.emit("error", e)
        job.future.set_exception(e)
        self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)

    def _drop_cancelled(self) -> None:
        """End the turns whose client went away: out of the batch at once, what was computed saved."""
        for i in reversed(range(len(self._decoding))):
            if self._decoding[i].job.cancelled.is_set():
                t = self._decoding.pop(i)  # (a finished reply waiting for its last token is not cut)
                self._end(t, self._batch.leave(i), interrupted=not t.closing)
        for t in [t for t in self._prefilling if t.job.cancelled.is_set()]:
            self._prefilling.remove(t)
            if t.agent is None:  # not begun: nothing computed
                self._failed(t.job, ConnectionAbortedError("the client went away before its turn started"))
            else:
                self._end(t, None, interrupted=True)
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self._failed(job, ConnectionAbortedError("the client went away before its turn started"))

    def _alone(self, job: TurnJob) -> bool:
        return not self.batched or len(job.turn.prompt) < 2

    def _admit(self) -> None:
        """Admit waiting turns, oldest first, while there is room and their conversation is free.

        An admitted turn finds its cache only when its prefill starts (`_prefill_one`): by then the
        turns before it have prefilled, so a prompt sharing their prefix starts from a copy of theirs.
        """
        for job in list(self._waiting):
            if self.active() >= self.max_concurrency:
                return
            if self._alone(job):
                if self.active():
                    return  # it runs alone: the batch drains first, and nothing overtakes it
                self._waiting.remove(job)
                self._run(job)
                continue
            if self._taken(job):
                continue  # the same conversation's previous turn is still running
            self._waiting.remove(job)
            self._prefilling.append(BatchTurn(self.conversations, job.turn, job))

    def _taken(self, job: TurnJob) -> bool:
        """Whether the conversation this turn continues has a turn admitted already."""
        target = self.conversations.target(job.turn)
        if target is None:
            return False
        return target in self.conversations.manager.busy or any(
            t.agent is None and self.conversations.target(t.req) == target for t in self._prefilling
        )

    def _prefill_one(self) -> None:
        """One prefill step of the oldest admitted prompt (its cache found first); a finished one joins the batch."""
        t = self._prefilling[0]
        t0 = time.perf_counter()
        try:
            if t.agent is None:
                if self.conversations.target(t.req) in self.conversations.manager.busy:
                    self._prefilling.pop(0)  # its conversation became busy meanwhile: back in line
                    self._waiting.appendleft(t.job)  # type: ignore[arg-type]  # a BatchTurn holds its TurnJob
                    return
                t.begin()
            ready = t.prefill_step()
            if ready:
                self._batch.join(t.row(), t.res.cache)
        except BaseException as e:
            self._prefilling.pop(0)
            t.fail()
            self._failed(t.job, e)
            return
        log.debug(
            "prefill step of %s: %d of %d tokens in %.3fs", t.agent.name, t.fed, t.limit, time.perf_counter() - t0
        )
        if ready:
            self._prefilling.pop(0)
            self._decoding.append(t)
            log.info("%s joined the batch: %d decoding together", t.agent.name, len(self._decoding))

    def _decode_step(self) -> None:
        """One token for every conversation in the batch; the finished ones leave and are saved."""
        t0 = time.perf_counter()
        try:
            tokens = self._batch.step()
        except BaseException as e:  # the batch's caches are in an unknown state: every turn in it fails
            self._fail_active(e)
            return
        # A finished turn stays for one more step, which feeds its last token: its cache then holds
        # every token of the reply, as a turn run alone does (mlx-lm's generate_step feeds each token).
        fed_last = [i for i, t in enumerate(self._decoding) if t.closing]
        for t, token in zip(self._decoding, tokens):
            if not t.closing and t.take(token):
                t.closing = True
        t1 = time.perf_counter()
        for i in reversed(fed_last):
            t = self._decoding.pop(i)
            self._end(t, self._batch.leave(i))
        log.debug(
            "decode step: %d rows %.3fs, %d finished %.3fs",
            len(tokens),
            t1 - t0,
            len(fed_last),
            time.perf_counter() - t1,
        )

    def _end(self, t: BatchTurn, cache: list | None, interrupted: bool = False) -> None:
        try:
            result = t.finish(cache, interrupted)
        except BaseException as e:
            t.fail()
            self._failed(t.job, e)
        else:
            self._done(t.job, result)
