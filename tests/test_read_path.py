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
from kvstore.testing import make_cache, same_cache, tokens

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


def test_a_layout_read_from_a_damaged_file_is_not_remembered(tmp_path, monkeypatch):
    # A fresh process-wide memo: an earlier test's restore of the same bytes (same blob name) would
    # otherwise have remembered the true layout, and the damaged header would never be read.
    monkeypatch.setattr(scatter, "_VERIFIED", type(scatter._VERIFIED)())
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        cache = make_cache("kv", 16, mx.float16)
        store.save("a", cache, tokens(16), model=FP)
        path = _only_blob(store)
        blob_id = path.parent.name + path.name.split(".")[0]
        assert scatter._known_layout(blob_id) is None
        good = path.read_bytes()
        # Same length, a header that parses and fits, and a wrong shape: the hash must catch it.
        bad = good.replace(b'"shape":[1,2,16,', b'"shape":[2,1,16,', 1)
        assert bad != good
        path.write_bytes(bad)
        with pytest.raises(kvstore.CorruptBlobError):
            store.load("a", model=FP)
        assert scatter._known_layout(blob_id) is None  # read from the damaged file, and not remembered
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


def test_the_default_chunk_size_restores_bit_exact_and_continues(tmp_path):
    """Stores made without a chunk size use 256 tokens a chunk: whole chunks, a partial tail, and
    a longer request that continues the saved tokens all restore bit-exactly."""
    from kvstore.formats import DEFAULT_CHUNK_SIZE

    n = 2 * DEFAULT_CHUNK_SIZE + 37
    toks = tokens(n, vocab=200_000)
    with kvstore.open(tmp_path / "s") as store:
        assert store.chunk_size == DEFAULT_CHUNK_SIZE == 256
        cache = make_cache("kv", n, mx.bfloat16, layers=2)
        store.save("a", cache, toks, model=FP)
        loaded, got = store.load("a", model=FP)
        assert got == toks and same_cache(cache, loaded)
        longer, m = store.restore(toks + [7, 8, 9], model=FP)
        assert m == n and same_cache(cache, longer)
        diverged = toks[:300] + [t + 1 for t in toks[300:]]
        prefix, m = store.restore(diverged, model=FP)
        assert m == DEFAULT_CHUNK_SIZE
        assert all(
            np.array_equal(np.asarray(p.keys.view(mx.uint16)), np.asarray(c.keys[..., :m, :].view(mx.uint16)))
            for p, c in zip(prefix, cache)
        )


def _big_cache(n: int, layers: int = 4, heads: int = 8, dim: int = 128):
    """A KVCache list of float32 KV: 32 KiB a token with the defaults."""
    from mlx_lm.models.cache import KVCache

    out = []
    for layer in range(layers):
        a, b = mx.random.split(mx.random.key(layer))
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, heads, n, dim), key=a), mx.random.normal((1, heads, n, dim), key=b))
        out.append(c)
    mx.eval([c.keys for c in out] + [c.values for c in out])
    return out


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store holding one agent of more than scatter.PARALLEL_BYTES (36 MiB in 256-token chunks)."""
    n = 1100
    cache = _big_cache(n)
    assert sum(c.keys.nbytes + c.values.nbytes for c in cache) > scatter.PARALLEL_BYTES
    store = kvstore.open(tmp_path_factory.mktemp("big") / "s")
    store.save("big", cache, tokens(n, vocab=150_000), model=FP)
    yield store, cache
    store.close()


def test_large_restores_read_on_the_io_threads_and_are_bit_exact(big_store, monkeypatch):
    store, cache = big_store
    maps, threads = [], set()
    real_map, real_fill = IoPool.map, scatter.ScatterReader._fill

    def spy_map(self, fn, items, width=None):
        maps.append((self, width))
        return real_map(self, fn, items, width)

    def spy_fill(self, plan):
        threads.add(threading.current_thread().name)
        return real_fill(self, plan)

    monkeypatch.setattr(IoPool, "map", spy_map)
    monkeypatch.setattr(scatter.ScatterReader, "_fill", spy_fill)
    loaded, _ = store.load("big", model=FP)
    assert maps == [(store.io, scatter.READ_WIDTH)]  # the pool, not the serial path
    if scatter.READ_WIDTH > 1 and store.io.threads > 1:
        assert threads  # every blob was read by the caller or a pool thread, whichever was free
    assert same_cache(cache, loaded)


def test_a_flipped_byte_is_caught_on_the_parallel_read_path(big_store):
    store, _cache = big_store
    paths = sorted(p for _, p in store.blobs.iter_files())
    victim = paths[len(paths) // 2]
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2 + 123] ^= 0x10  # in the middle of the KV data, far from the header
    victim.write_bytes(bytes(bad))
    try:
        with pytest.raises(kvstore.CorruptBlobError):
            store.load("big", model=FP)
    finally:
        victim.write_bytes(good)
    assert store.fsck().ok


def _evicted(paths, scratch) -> bool:
    """Drop the files' pages from the page cache (they are clean: synced when saved); False if this file
    system keeps them (tried on `scratch` first: a read that may not wait also starts a read-ahead, so
    the files themselves are not probed)."""
    scratch.write_bytes(b"x" * 65536)
    fd = os.open(scratch, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(1)], 65535, os.RWF_NOWAIT)
            return False
        except BlockingIOError:
            pass
    finally:
        os.close(fd)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="Linux's RWF_NOWAIT tells a cold read apart")
def test_a_restore_from_the_device_reads_more_blobs_side_by_side(big_store, monkeypatch, tmp_path):
    """Blobs out of the page cache are read on the cold pool's wider set of threads, bit-exact; once
    they are cached, on the store's own threads again."""
    store, cache = big_store
    if not _evicted([p for _, p in store.blobs.iter_files()], tmp_path / "probe"):
        pytest.skip("this file system keeps file pages in memory")
    maps = []
    real_map = IoPool.map

    def spy_map(self, fn, items, width=None):
        maps.append((self, width))
        return real_map(self, fn, items, width)

    monkeypatch.setattr(IoPool, "map", spy_map)
    loaded, _ = store.load("big", model=FP)
    assert maps == [(scatter._COLD, scatter.COLD_READ_WIDTH)]
    assert same_cache(cache, loaded)
    store.load("big", model=FP)
    assert maps[1:] == [(store.io, scatter.READ_WIDTH)]
