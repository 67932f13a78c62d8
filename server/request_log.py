"""One log line and one metrics count per request, and the progress of long prefills in the log.

`RequestLog` wraps the whole ASGI app (the API-key guard included, so a 401 is logged too). The
jobs a request submits to the model thread are collected through a context variable that
`ServerState.submit` appends to; when the response has been sent, a turn's result adds its
tokens, cache hits and TTFT to the line. A streamed turn whose client went away is still running
then: its line is written when the model thread finishes it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import Future
from typing import Any

from . import metrics

__all__ = ["RequestLog", "PrefillProgress", "track_job"]

log = logging.getLogger("kvstore.server")
QUIET_PATHS = ("/health", "/metrics")  # polled by monitors: their lines are debug-level
_jobs: contextvars.ContextVar[list | None] = contextvars.ContextVar("kvstore_request_jobs", default=None)


def track_job(job: Any) -> None:
    """Note a job the current request submitted (ServerState.submit calls this)."""
    jobs = _jobs.get()
    if jobs is not None:
        jobs.append(job)


class RequestLog:
    """ASGI middleware: logs `METHOD PATH STATUS SECONDS` plus the turn's figures, and counts the request."""

    def __init__(self, app, stopping=lambda: False):
        self.app = app
        self.stopping = stopping  # whether the server is shutting down (an interrupted turn is then no mystery)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # unless the app answers (an exception that escapes it is a 500 to the client)
        jobs: list = []
        token = _jobs.set(jobs)

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            _jobs.reset(token)
            self._finish(scope, status, started, jobs)

    def _finish(self, scope, status: int, started: float, jobs: list) -> None:
        path = scope["path"]
        metrics.count_request(path, status)
        head = f"{scope['method']} {path} {status}"
        if not jobs or path in QUIET_PATHS:
            level = logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO
            log.log(level, "%s %.3fs", head, time.perf_counter() - started)
            return
        job = jobs[-1]
        if job.future.done():
            self._turn_line(head, started, job.future)
        else:  # the client went away mid-stream: the model thread stops at its next token
            job.future.add_done_callback(lambda f: self._turn_line(head, started, f))

    def _turn_line(self, head: str, started: float, future: Future) -> None:
        seconds = time.perf_counter() - started
        if future.cancelled() or future.exception() is not None:
            log.info("%s %.3fs: %s", head, seconds, "cancelled" if future.cancelled() else future.exception())
            return
        from .conversations import TurnResult  # (imports the agents, hence mlx: not before `serve` runs)

        r = future.result()
        if not isinstance(r, TurnResult):  # a lookup, stats or clearing
            log.info("%s %.3fs", head, seconds)
            return
        metrics.observe_turn(r)
        s = r.reply.stats
        end = ""
        if r.reply.finish_reason == "interrupted":
            end = ", stopped: the server is shutting down" if self.stopping() else ", stopped: the client went away"
        log.info(
            "%s %.3fs %s: prompt %d, cached %d (ram %d, disk %d), prefilled %d, generated %d, ttft %.3fs, %.1f tok/s%s",
            head,
            seconds,
            r.conversation,
            r.prompt_tokens,
            r.cached,
            r.cached_ram,
            r.cached_disk,
            r.prefilled,
            s.generated_tokens,
            r.ttft,
            s.tokens_per_second,
            end,
        )


class PrefillProgress:
    """The AgentManager's prefill callback: logs tokens done, tokens/s and the ETA at most every `every` seconds.

    The rate is measured from the first step's end (when the callback first hears of this prefill),
    so the first line comes with the second step at the earliest.
    """

    def __init__(self, every: float = 5.0):
        self.every = every
        self._key: tuple[str, int] | None = None
        self._t0 = self._last = 0.0
        self._done0 = 0

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._key != (name, total) or done <= self._done0:  # a new prefill
            self._key, self._t0, self._last, self._done0 = (name, total), now, now, done
            return
        if done >= total or now - self._last < self.every:
            return
        self._last = now
        rate = (done - self._done0) / max(now - self._t0, 1e-9)
        log.info(
            "prefill %s: %d of %d tokens, %.0f tok/s, about %.0fs left", name, done, total, rate, (total - done) / rate
        )
