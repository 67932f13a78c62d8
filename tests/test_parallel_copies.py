"""A save's blobs cut from the cache's memory by offset and copied on two threads: the same bytes as
numpy's views and one thread, and a copy that fails on one thread leaves nothing behind."""

from __future__ import annotations

import errno
import itertools
import os
import threading
import types

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore.blob import local, tensorfile
from kvstore.ops import blob_writes
from kvstore.testing import make_cache, same_cache, tokens

FP = "5a" * 16
REAL_START_PUT = local.BlobStore.start_put


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32, mx.uint32])
@pytest.mark.parametrize("lead", [(1,), (1, 3), (2, 3), ()])
def test_blocks_cut_by_offset_are_the_bytes_of_numpy_views(dtype, lead):
    rng = np.random.default_rng(len(lead) * 10 + dtype.size)
    positions, width = 37, 5
    a = mx.array(rng.integers(0, 60_000, (*lead, positions, width)).astype(np.uint32)).astype(dtype)
    mx.eval(a)
    whole = tensorfile.host(a)
    assert whole.flat is not None  # an evaluated, contiguous array: its own memory
    plain = np.asarray(a.view(mx.uint16) if dtype == mx.bfloat16 else a)
    spans = [(0, positions), (0, 1), (36, 37), (5, 5), (3, 30)]
    for (a0, b0), (a1, b1) in itertools.product(spans, [(0, None), (1, 4), (0, 0)]):
        part = whole.positions(a0, b0)
        expect = plain[..., a0:b0, :]
        if b1 is not None and a1 <= b0 - a0:  # positions of positions
            end = min(b1, b0 - a0)
            part, expect = part.positions(a1, end), expect[..., a1:end, :]
        assert part.shape == expect.shape and part.nbytes == expect.nbytes
        assert b"".join(part.blocks()) == np.ascontiguousarray(expect).tobytes()
        assert [len(b) for b in part.blocks()] == [len(b) for b in tensorfile.blocks(expect)]


def _threads_copying(monkeypatch, wait_for: int = 1) -> set[str]:
    """The names of the threads that copy a blob from now on (a spy on BlobStore.start_put). Each copy
    waits until `wait_for` threads have started one (at most 10 s): small blobs could otherwise all be
    copied by the caller before the helper thread wakes."""
    seen: set[str] = set()
    enough = threading.Event()

    def spy(self, buffers):
        seen.add(threading.current_thread().name)
        if len(seen) >= wait_for:
            enough.set()
        enough.wait(timeout=10)
        return REAL_START_PUT(self, buffers)

    monkeypatch.setattr(local.BlobStore, "start_put", spy)
    return seen


def test_a_save_copied_on_two_threads_stores_the_blobs_one_thread_stores(tmp_path, monkeypatch):
    toks = tokens(200, seed=4)
    cache = make_cache("kv", 200, layers=4, seed=4)
    ids = {}
    for width in (1, 2):
        monkeypatch.setattr(blob_writes, "COPY_WIDTH", width)
        monkeypatch.setattr(blob_writes, "COPY_PARALLEL_BYTES", 0)
        seen = _threads_copying(monkeypatch, wait_for=width)
        with kvstore.open(tmp_path / f"w{width}", chunk_size=16, io_threads=4) as store:
            snap = store.save("a", cache, toks, model=FP)
            assert snap.blobs_written == 13  # 200 tokens in chunks of 16
            assert len(seen) == width  # the caller, and one I/O thread beside it
            ids[width] = sorted(b for b, _ in store.blobs.iter_files())
            got, got_toks = store.load("a", model=FP)
            assert list(got_toks) == toks and same_cache(got, cache)
    assert ids[1] == ids[2]  # a blob's name is the hash of its bytes: the same bytes either way


def test_a_small_save_copies_on_the_callers_thread_alone(tmp_path, monkeypatch):
    seen = _threads_copying(monkeypatch)
    with kvstore.open(tmp_path / "s", chunk_size=16, io_threads=4) as store:
        store.save("a", make_cache("kv", 200, layers=4, seed=5), tokens(200, seed=5), model=FP)
    assert seen == {threading.current_thread().name}


class _FailingWritev(types.SimpleNamespace):
    """`os` for tensorfile.write_all whose `nth` writev fails with ENOSPC (counted across threads)."""

    def __init__(self, nth: int):
        super().__init__()
        self.nth, self.calls, self.lock = nth, 0, threading.Lock()

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr != "writev":
            return real

        def writev(fd, buffers):
            with self.lock:
                self.calls += 1
                fail = self.calls == self.nth
            if fail:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, buffers)

        return writev


@pytest.mark.parametrize("nth", [1, 4, 9])
def test_a_copy_failing_on_one_thread_commits_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch, nth):
    monkeypatch.setattr(blob_writes, "COPY_WIDTH", 2)
    monkeypatch.setattr(blob_writes, "COPY_PARALLEL_BYTES", 0)
    with kvstore.open(tmp_path / "s", chunk_size=16, io_threads=4) as store:
        before, before_toks = make_cache("kv", 40, layers=4, seed=6), tokens(40, seed=6)
        store.save("before", before, before_toks, model=FP)
        fake = _FailingWritev(nth)
        monkeypatch.setattr(tensorfile, "os", fake)
        toks = tokens(200, seed=7)
        with pytest.raises(kvstore.StoreFullError, match="nothing was committed"):
            store.save("late", make_cache("kv", 200, layers=4, seed=7), toks, model=FP)
        monkeypatch.undo()
        assert fake.calls >= nth
        assert list(store.blobs.iter_temp()) == []  # the other thread's copies were finished or removed
        assert [a.name for a in store.agents()] == ["before"]
        got, got_toks = store.load("before", model=FP)
        assert list(got_toks) == before_toks and same_cache(got, before)
        store.gc(grace=0)
        assert store.fsck(grace=0).problems == ()
        store.save("late", make_cache("kv", 200, layers=4, seed=7), toks, model=FP)  # room again: it saves
        assert list(store.load("late", model=FP)[1]) == toks
