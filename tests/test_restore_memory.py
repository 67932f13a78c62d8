"""Restores build arrays without zero-filling them first, and give their memory back when dropped."""

from __future__ import annotations

import ctypes
import gc

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore.blob import tensorfile, uninit
from kvstore.blob.tensorfile import writable_view
from kvstore.testing import DTYPES, KINDS, make_cache, same_cache, tokens

FP = "5a" * 16
C = 16


@pytest.fixture
def uninitialized(monkeypatch):
    """Every restore takes the uninitialized path, with buffers small enough that layers share them
    and a restore spans several (the real thresholds only reach it from 16 MiB up)."""
    monkeypatch.setattr(uninit, "ZEROS_BELOW", 0)
    monkeypatch.setattr(uninit, "GROUP_BYTES", 4096)
    # Leave non-zero garbage in MLX's buffer cache, where the next allocations come from: a position
    # the restore failed to write would then show up as a difference, not as a lucky zero.
    junk = [mx.full((n,), 7, dtype=mx.uint8) for n in (4096, 4096, 2048, 1024, 8192)]
    mx.eval(junk)
    del junk


def test_this_mlx_allocates_without_writing():
    """The fast path is live on the installed MLX (a loader change would fall back to zeros silently)."""
    flats = uninit._flats([4096, 64])
    assert flats is not None
    assert [f.shape for f in flats] == [(4096,), (64,)] and all(f.dtype == mx.uint8 for f in flats)


def test_uninitialized_arrays_are_separate_writable_and_shaped():
    specs = [((1, 2, 5, 3), mx.bfloat16), ((1, 2, 5, 3), mx.float32), ((7,), mx.float16), ((3, 4), mx.int32)]
    arrays = uninit.empty(specs)
    assert [(tuple(a.shape), a.dtype) for a in arrays] == [(s, d) for s, d in specs]
    for i, a in enumerate(arrays):
        view, _ = writable_view(a)
        view[...] = np.arange(view.size, dtype=view.dtype).reshape(view.shape) + i * 10
    for i, a in enumerate(arrays):  # each array kept its own values: no two share bytes
        got = np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).ravel()
        assert np.array_equal(got, np.arange(got.size, dtype=got.dtype) + i * 10)


def address(a: mx.array) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(a).cast("B")))


def test_arrays_start_at_the_page_phase_asked_for(uninitialized):
    specs = [((1, 2, 64, 8), mx.bfloat16), ((3, 5), mx.float32), ((1, 2, 64, 8), mx.float16), ((100,), mx.float32)]
    phases = [0, None, 1216, 8]
    arrays = uninit.empty(specs, phases)
    for a, phase in zip(arrays, phases):
        assert address(a) % (uninit.PAGE if phase is not None else uninit.ALIGN) == (phase or 0)
    spans = sorted((address(a), address(a) + a.nbytes) for a in arrays)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # none overlap


@pytest.mark.parametrize("apart", [True, False])
def test_arrays_of_different_lifetimes_never_share_a_buffer(uninitialized, monkeypatch, apart):
    """A sliding-window layer's arrays live as long as its cache; a full-attention layer's are replaced
    at its first append. Sharing a buffer would keep the replaced ones' memory alive."""
    monkeypatch.setattr(uninit, "GROUP_BYTES", 64 << 20)
    mib = 1 << 20
    base = mx.get_active_memory()
    arrays = uninit.empty([((256, 1024), mx.float32)] * 4, lifetimes=[True, False, True, False] if apart else None)
    kept = arrays[0], arrays[2]
    held = mx.get_active_memory() - base
    del arrays
    freed = held - (mx.get_active_memory() - base)
    assert held >= 4 * mib  # all four arrays really took memory, so "freed" below measures something
    if apart:
        assert freed >= 2 * mib  # the replaced arrays' own buffer went with them
    else:
        assert freed == 0  # one shared buffer: the kept arrays hold it all
    assert all(a.shape == (256, 1024) for a in kept)  # (and keep them alive until here)


@pytest.mark.parametrize("page_aligned", [True, False])
def test_restored_arrays_lie_in_memory_as_their_data_lies_in_the_blob(
    tmp_path, uninitialized, monkeypatch, page_aligned
):
    """The kernel copies out of the page cache fastest when source and destination share their place in
    a page: each restored array starts where its tensor's data starts, modulo a page (also in blobs
    written before data sections were page-aligned)."""
    monkeypatch.setattr(tensorfile, "PAGE_ALIGN_FROM", 0 if page_aligned else 1 << 40)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        cache = make_cache("kv", C, mx.float16, layers=3)
        store.save("a", cache, tokens(C), model=FP)
        ((_blob_id, path),) = list(store.blobs.iter_files())
        base, header, _meta = tensorfile.parse_header(path.read_bytes())
        assert (base % uninit.PAGE == 0) == page_aligned
        loaded, _ = store.load("a", model=FP)
        for slot, c in enumerate(loaded):
            for arr, name in ((c.keys, "k"), (c.values, "v")):
                begin = header[f"{slot}.{name}"]["data_offsets"][0]
                assert address(arr) % uninit.PAGE == (base + begin) % uninit.PAGE
        assert same_cache(cache, loaded)


def test_arrays_come_from_zeros_when_the_loader_refuses(monkeypatch):
    monkeypatch.setattr(uninit, "ZEROS_BELOW", 0)
    monkeypatch.setattr(uninit, "_flats", lambda sizes: None)
    arrays = uninit.empty([((2, 3), mx.float16), ((4,), mx.bfloat16)])
    assert [tuple(a.shape) for a in arrays] == [(2, 3), (4,)]
    assert all(not bool(mx.any(a).item()) for a in arrays)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_restores_into_uninitialized_arrays_are_bit_exact(tmp_path, uninitialized, kind, dtype):
    n = 3 * C + 5
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        cache = make_cache(kind, n, DTYPES[dtype], seed=3, window=24, stepped=True)
        store.save("a", cache, tokens(n), model=FP)
        loaded, _ = store.load("a", model=FP)
        assert same_cache(cache, loaded)


def test_layers_sharing_a_buffer_do_not_see_each_others_writes(tmp_path, uninitialized):
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        cache = make_cache("kv", 2 * C, mx.float16, layers=4)
        store.save("a", cache, tokens(2 * C), model=FP)
        loaded, _ = store.load("a", model=FP)
        before = [mx.array(c.keys) for c in loaded]
        loaded[0].keys[..., :2, :] = 7.0  # in place if MLX may: it must not reach layers 1-3
        k = mx.ones((1, 2, 3, 8), dtype=mx.float16)
        loaded[1].update_and_fetch(k, k)
        mx.eval([c.keys for c in loaded])
        assert all(bool(mx.array_equal(b, c.keys).item()) for b, c in zip(before[2:], loaded[2:]))
        assert not bool(mx.array_equal(before[0], loaded[0].keys).item())


def test_a_dropped_restore_frees_its_memory_without_the_cycle_collector(tmp_path):
    """Restored caches held in a reference cycle stayed allocated until Python's cycle collector ran:
    a multi-agent process then held dropped caches' memory, and the next restore got fresh pages."""
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        cache = make_cache("cachelist", 4 * C, mx.float32, layers=3)
        store.save("a", cache, tokens(4 * C), model=FP)
        del cache
        gc.collect()
        gc.disable()
        try:
            baseline = mx.get_active_memory()
            loaded, _ = store.load("a", model=FP)
            held = mx.get_active_memory() - baseline
            assert held > 0
            del loaded
            assert mx.get_active_memory() - baseline < held // 10
        finally:
            gc.enable()


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding addr, from /proc/self/smaps."""
    flags, inside = set(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
    return flags


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages here")
def test_large_restores_land_in_memory_advised_into_huge_pages(tmp_path, monkeypatch):
    """A large restore's arrays are in memory marked for transparent huge pages (VmFlags 'hg'):
    in a process with MLX's default cache limit that memory is new each time, and 4 KiB pages
    cost a fault each."""
    from mlx_lm.models.cache import KVCache

    monkeypatch.setattr(uninit, "ZEROS_BELOW", 0)
    n = 1024
    with kvstore.open(tmp_path / "s") as store:
        cache = []
        for layer in range(2):  # 4 MiB arrays: two huge pages each
            c = KVCache()
            a, b = mx.random.split(mx.random.key(layer))
            c.update_and_fetch(mx.random.normal((1, 8, n, 128), key=a), mx.random.normal((1, 8, n, 128), key=b))
            cache.append(c)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        store.save("a", cache, tokens(n), model=FP)
        loaded, _ = store.load("a", model=FP)
        assert same_cache(cache, loaded)
        for c in loaded:
            assert c.keys.nbytes >= 2 * uninit.HUGE_PAGE
            assert "hg" in _vm_flags(address(c.keys) + c.keys.nbytes // 2)


def test_huge_page_advice_is_only_advice(monkeypatch):
    """Small ranges are left alone, and without the call (not Linux) nothing changes."""
    flats = uninit._flats([uninit.HUGE_PAGE // 2])
    assert not uninit.advise_huge_pages(address(flats[0]), flats[0].nbytes)
    monkeypatch.setattr(uninit, "LIBC", None)  # (uninit imports it from kvstore.blob.libc)
    arrays = uninit.empty([((1024, 1024), mx.float32)])
    assert arrays[0].shape == (1024, 1024)
