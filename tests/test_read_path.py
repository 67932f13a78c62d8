"""The read path's shortcuts keep every check: the I/O pool, cached blob layouts, full coverage."""

from __future__ import annotations

import os
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore.blob import scatter
from kvstore.blob.iopool import IoPool
from cachegen import make_cache, same_cache, tokens

FP = "34" * 16


def test_io_pool_starts_nothing_after_an_error_and_waits_for_what_runs():
    started, finished = [], []

    def work(i):
        started.append(i)
        if i == 1:
            raise OSError(28, "No space left on device")
        time.sleep(0.05)
        finished.append(i)
        return i

    pool = IoPool(4)
    try:
        with pytest.raises(OSError):
            pool.map(work, range(40))
        settled = sorted(finished)
        assert settled == sorted(set(started) - {1})  # every call started has ended when the error is out
        time.sleep(0.1)
        assert sorted(finished) == settled and len(started) < 40  # and no new one began
        assert pool.map(lambda i: i * 2, range(5)) == [0, 2, 4, 6, 8]
    finally:
        pool.close()


def test_io_pool_runs_at_most_width_calls_at_once():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return i

    pool = IoPool(4)
    try:
        for width, most in ((2, 2), (None, 4), (9, 4), (1, 1)):
            peak[0] = 0
            assert pool.map(work, range(16), width=width) == list(range(16))
            assert 1 <= peak[0] <= most
    finally:
        pool.close()


def test_io_pool_start_leaves_the_caller_free_and_reports_errors():
    gate = threading.Event()

    def work(i):
        gate.wait(5)
        if i == 3:
            raise OSError(28, "No space left on device")
        return i * 2

    for threads in (4, 1):
        pool = IoPool(threads)
        try:
            if threads > 1:
                running = pool.start(work, range(3))
                assert not running.done()  # the caller goes on while the pool works
                gate.set()
                assert running.result(timeout=5) == [0, 2, 4]
            gate.set()
            assert pool.start(work, range(3)).result(timeout=5) == [0, 2, 4]
            assert isinstance(pool.start(work, range(5)).exception(timeout=5), OSError)
        finally:
            pool.close()
        gate.clear()


def test_io_pool_maps_started_on_every_thread_at_once_finish():
    """A started map runs on a pool thread and asks for helpers. With every thread taken by such maps,
    a helper still queued must not be waited for: that would deadlock."""
    pool = IoPool(2)
    try:
        started = [pool.start(lambda i: (time.sleep(0.002), i)[1], range(6)) for _ in range(5)]
        assert [f.result(timeout=20) for f in started] == [list(range(6))] * 5
    finally:
        pool.close()


def test_io_pool_starts_its_threads_once():
    pool = IoPool(2)
    try:
        pool.map(lambda i: i, range(4))
        before = {t.ident for t in threading.enumerate() if t.name.startswith("kvstore-io")}
        pool.map(lambda i: i, range(4))
        after = {t.ident for t in threading.enumerate() if t.name.startswith("kvstore-io")}
        assert before and after == before
    finally:
        pool.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_io_pool_works_in_a_forked_child():
    pool = IoPool(2)
    pool.map(lambda i: i, range(4))  # threads exist in the parent only
    pid = os.fork()
    if pid == 0:
        ok = pool.map(lambda i: i + 1, range(4)) == [1, 2, 3, 4]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    pool.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _only_blob(store):
    return next(p for _, p in store.blobs.iter_files())


def test_a_damaged_header_is_refused_even_after_a_good_read(tmp_path):
    """A verified layout is remembered by blob name; the bytes on disk are still read and hashed."""
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        cache = make_cache("kv", 16, mx.float16)
        store.save("a", cache, tokens(16), model=FP)
        store.load("a", model=FP)  # remembers the blob's layout
        path = _only_blob(store)
        good = path.read_bytes()
        bad = bytearray(good)
        bad[12] ^= 0x01  # inside the JSON header
        path.write_bytes(bytes(bad))
        with pytest.raises(kvstore.CorruptBlobError):
            store.load("a", model=FP)
        path.write_bytes(good)
        restored, _ = store.load("a", model=FP)
        assert np.array_equal(np.asarray(restored[0].keys), np.asarray(cache[0].keys[..., :16, :]))


def test_a_layout_read_from_a_damaged_file_is_not_remembered(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        cache = make_cache("kv", 16, mx.float16)
        store.save("a", cache, tokens(16), model=FP)
        path = _only_blob(store)
        good = path.read_bytes()
        # Same length, a header that parses and fits, and a wrong shape: the hash must catch it.
        bad = good.replace(b'"shape":[1,2,16,', b'"shape":[2,1,16,', 1)
        assert bad != good
        path.write_bytes(bad)
        with pytest.raises(kvstore.CorruptBlobError):
            store.load("a", model=FP)
        path.write_bytes(good)  # repaired: the next restore must use the true header
        restored, _ = store.load("a", model=FP)
        assert np.array_equal(np.asarray(restored[0].keys), np.asarray(cache[0].keys[..., :16, :]))


def test_a_plan_that_leaves_positions_unfilled_returns_nothing(tmp_path, monkeypatch):
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("a", make_cache("kv", 40, mx.float16), tokens(40), model=FP)
        real_add = scatter.ScatterReader.add
        seen = set()

        def skip_one_chunk(self, blob_id, slot, file_from):
            if file_from == 16:  # drop the middle chunk from the plan
                seen.add(blob_id)
                return
            real_add(self, blob_id, slot, file_from)

        monkeypatch.setattr(scatter.ScatterReader, "add", skip_one_chunk)
        with pytest.raises(kvstore.StoreError, match="filled 24 of 40 positions"):
            store.load("a", model=FP)
        assert seen


def test_chunk_blobs_are_placed_from_one_template_per_tensor_list(tmp_path, monkeypatch):
    """Full chunks (and the partial tail, with its own tensor list) skip the per-blob general path."""
    general = []
    real_runs = scatter.ScatterReader._runs

    def counted(self, plan, head):
        general.append(plan.blob_id)
        return real_runs(self, plan, head)

    monkeypatch.setattr(scatter.ScatterReader, "_runs", counted)
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        cache = make_cache("kv", 4 * 16 + 5, mx.float16, layers=3)
        store.save("a", cache, tokens(69), model=FP)
        restored, _ = store.load("a", model=FP)
        assert same_cache(cache, restored)
        assert general == []
        # A sliding window that starts inside a chunk still takes the general path, and is exact.
        rot = make_cache("rotating", 4 * 16 + 5, mx.float16, window=24, stepped=True)
        store.save("r", rot, tokens(69, seed=1), model="35" * 16)
        restored, _ = store.load("r", model="35" * 16)
        assert same_cache(rot, restored)
        assert general
