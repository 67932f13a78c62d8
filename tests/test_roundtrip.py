"""Save -> load is bit-exact for every cache kind, dtype and length (issue 2)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import TEST_CHUNK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore.testing import DTYPES, KINDS, make_cache, same_cache, tokens

FP = "0f" * 16
C = TEST_CHUNK
EDGE_LENGTHS = [0, 1, C - 1, C, C + 1, 3 * C + 5]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_save_load_bit_exact(store, kind, dtype, n):
    cache = make_cache(kind, n, DTYPES[dtype], seed=n)
    toks = tokens(n, seed=n)
    snap = store.save("a", cache, toks, model=FP)
    assert snap.n_tokens == n
    loaded, got_tokens = store.load("a", model=FP)
    assert got_tokens == toks
    assert same_cache(cache, loaded)
    assert store.fsck().ok


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(sorted(DTYPES)),
    n=st.integers(0, 5 * C + 3),
    stepped=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_roundtrip_arbitrary_caches(tmp_path_factory, kind, dtype, n, stepped, seed):
    path = tmp_path_factory.mktemp("rt")
    with kvstore.open(path / "s", chunk_size=C) as store:
        cache = make_cache(kind, n, DTYPES[dtype], seed=seed, stepped=stepped)
        toks = tokens(n, seed=seed)
        store.save(f"agent-{seed}", cache, toks, model=FP)
        loaded, got = store.load(f"agent-{seed}", model=FP)
        assert got == toks
        assert same_cache(cache, loaded)


def test_rotating_window_after_rotation(store):
    """A sliding-window layer that has wrapped around several times restores its window exactly."""
    cache = make_cache("rotating", 5 * C + 7, mx.bfloat16, window=24, stepped=True)
    toks = tokens(5 * C + 7)
    store.save("r", cache, toks, model=FP)
    loaded, _ = store.load("r", model=FP)
    assert same_cache(cache, loaded)
    # The restored cache behaves like the original on the next steps (decode and prefill paths).
    for step in (1, 5, 1):
        k = mx.random.normal((1, 2, step, 8), key=mx.random.key(step)).astype(mx.bfloat16)
        for a, b in zip(cache, loaded):
            # The mask is made before the update, as a model's attention does; the keys and values
            # fetched must be the very same at every step (a decode step's mask is None on both sides).
            mask_a = a.make_mask(step, window_size=24, return_array=True)
            mask_b = b.make_mask(step, window_size=24, return_array=True)
            assert (mask_a is None) == (mask_b is None)
            if mask_a is not None:
                assert bool(mx.array_equal(mask_a, mask_b).item())
            ka, va = a.update_and_fetch(k, k)
            kb, vb = b.update_and_fetch(k, k)
            assert bool(mx.array_equal(ka, kb).item()) and bool(mx.array_equal(va, vb).item())
            assert a.offset == b.offset
        assert same_cache(cache, loaded)


def test_restored_caches_do_not_alias(store):
    """Two agents restored from the same blobs must not see each other's appends."""
    cache = make_cache("kv", 2 * C, mx.float16)
    toks = tokens(2 * C)
    store.save("a", cache, toks, model=FP)
    first, _ = store.load("a", model=FP)
    second, _ = store.load("a", model=FP)
    before = [mx.array(c.keys) for c in second]
    for c in first:
        k = mx.ones((1, 2, 3, 8), dtype=mx.float16)
        c.update_and_fetch(k, k)
        c.keys[..., :2, :] = 7.0
    mx.eval([c.keys for c in first])
    assert all(bool(mx.array_equal(b, c.keys).item()) for b, c in zip(before, second))
    assert all(c.offset == 2 * C for c in second)


def test_only_used_tokens_are_stored(store):
    """mlx-lm allocates KV in steps of 256; only the positions in use reach the disk."""
    cache = make_cache("kv", 5, mx.float32, layers=1)
    assert cache[0].keys.shape[2] == 256
    snap = store.save("a", cache, tokens(5), model=FP)
    payload = 2 * 2 * 5 * 8 * 4  # keys + values, 2 heads, 5 positions, dim 8, float32
    assert payload <= snap.bytes_written < payload + 1024


def test_unknown_cache_class_refused(store):
    from mlx_lm.models.cache import ConcatenateKVCache

    c = ConcatenateKVCache()
    c.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    with pytest.raises(kvstore.UnsupportedCacheError, match="ConcatenateKVCache"):
        store.save("a", [c], [1, 2, 3], model=FP)
    assert store.agents() == []


def test_tokens_must_match_cache_length(store):
    cache = make_cache("kv", 10, mx.float16)
    with pytest.raises(kvstore.StoreError, match="seen 10 tokens but 9"):
        store.save("a", cache, tokens(9), model=FP)
    assert store.agents() == []
