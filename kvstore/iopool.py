"""The worker threads a store does its blob I/O on, started once and kept.

Starting a thread costs about a millisecond here, as much as the writes of a small save or the reads
of a small restore; a pool per call made every save and restore pay it again.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class IoPool:
    def __init__(self, threads: int):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """fn over items on the pool's threads (in the caller's thread for one item or one thread).

        Returns only when every call has ended, also when one raised (its error is raised then): a
        failed save must not leave writes running behind it, to finish after it has reported.
        """
        items = list(items)
        if self.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        futures = [self._executor().submit(fn, x) for x in items]
        wait(futures)
        return [f.result() for f in futures]

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            # A forked child inherits the pool object but not its threads: it starts its own.
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kvstore-io")
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)
