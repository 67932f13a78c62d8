"""The worker threads a store does its blob I/O on, started once and kept.

Starting a thread costs about a millisecond here, as much as the writes of a small save or the reads
of a small restore; a pool per call made every save and restore pay it again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

# Cores this process may run on: the width of CPU-bound work (hashing, copies out of the page cache).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

T = TypeVar("T")
R = TypeVar("R")


class IoPool:
    def __init__(self, threads: int):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def map(self, fn: Callable[[T], R], items: Iterable[T], width: int | None = None) -> list[R]:
        """fn over items, at most `width` (default: the pool's threads) at a time; results in order.

        The calling thread works through the items too, next to width - 1 of the pool's threads
        (one item, or a width of one, runs in the caller alone). After a call raises, no new item
        starts; map returns only when every call started has ended, then raises the error of the
        first item that failed: a failed save must not leave writes running behind it.
        """
        items = list(items)
        width = min(width or self.threads, self.threads, len(items))
        if width <= 1:
            return [fn(x) for x in items]
        results: list = [None] * len(items)
        errors: dict[int, BaseException] = {}
        todo = iter(range(len(items)))
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    i = None if errors else next(todo, None)
                if i is None:
                    return
                try:
                    results[i] = fn(items[i])
                except BaseException as e:  # noqa: BLE001 - handed to the caller below
                    with lock:
                        errors[i] = e

        helpers = [self._executor().submit(work) for _ in range(width - 1)]
        work()
        # A helper still queued has nothing left to do: cancelled, not waited for. Waiting could
        # deadlock when map itself runs on a pool thread (start) and the other threads are busy.
        # (wait() would count a cancelled future as pending until a thread dequeues it.)
        running = [h for h in helpers if not h.cancel()]
        wait(running)
        for h in running:
            h.result()
        if errors:
            raise errors[min(errors)]
        return results

    def start(self, fn: Callable[[T], R], items: Iterable[T], width: int | None = None) -> Future:
        """map() on one of the pool's threads, leaving the caller free; the future holds its results.

        With a single thread nothing runs beside the caller: the map runs here, the future is done.
        """
        items = list(items)
        if self.threads <= 1:
            done: Future = Future()
            try:
                done.set_result(self.map(fn, items, width))
            except BaseException as e:  # noqa: BLE001 - the future reports it, as a pool thread's would
                done.set_exception(e)
            return done
        return self._executor().submit(self.map, fn, items, width)

    def submit(self, fn: Callable[..., R], *args) -> Future:
        """fn(*args) on one of the pool's threads (here, at once, with a single thread)."""
        if self.threads <= 1:
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the future reports it, as a pool thread's would
                done.set_exception(e)
            return done
        return self._executor().submit(fn, *args)

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


def gather(futures: list[Future]) -> Future:
    """A future of every result of `futures`, in order; done when all are, with the first failure's error."""
    out: Future = Future()
    if not futures:
        out.set_result([])
        return out
    left, lock = [len(futures)], threading.Lock()

    def one_done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result([f.result() for f in futures])

    for f in futures:
        f.add_done_callback(one_done)
    return out
