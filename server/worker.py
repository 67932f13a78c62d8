"""The one thread that runs the model: jobs in arrival order, their events handed to the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("kvstore.server")


class Job:
    """A request's work on the model thread: its events go to an asyncio queue; `cancel()` stops it."""

    def __init__(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop | None):
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.future: Future = Future()

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event ("delta", "done", "error", ...) to the request's coroutine."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs jobs one at a time on a dedicated thread: MLX is not re-entrant, and requests queue FIFO."""

    def __init__(self, name: str = "kvstore-model"):
        self._queue: queue.Queue = queue.Queue()
        self._running: Job | None = None
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue `fn(job)`; its return value resolves job.future, an exception is also emitted as "error"."""
        job = Job(fn, loop)
        with self._lock:
            self._pending.append(job)
        self._queue.put(job)
        return job

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the model thread and wait for its result (for start-up and shutdown work)."""
        return self.submit(lambda job: fn()).future.result()

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def cancel_all(self) -> None:
        """Stop the running job at its next token and every queued one before it starts."""
        with self._lock:
            for job in self._pending:
                job.cancel()

    def stop(self) -> None:
        """Finish the running job, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                result = job.fn(job)
            except BaseException as e:  # handed to the request; the thread keeps serving
                if not isinstance(e, Exception):
                    log.exception("model thread: %s", e)
                job.emit("error", e)
                job.future.set_exception(e)
            else:
                job.emit("done", result)
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._pending.remove(job)
