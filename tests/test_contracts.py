"""Contracts of the engine that a broken engine would break (issue 15, "Tests that would not notice").

Each test here is one promise, with data chosen so that a plausible bug cannot pass by luck:
distinct agents of the same shapes, token ids past 16 bits, snapshots that only their label or pin
keeps alive, and a change in every single token position of a chunk.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlc

import kvstore
from kvstore.blob import scatter
from kvstore.cache.keys import chunk_keys
from kvstore.testing import make_cache, same_cache, tokens

FP = "c0" * 16
C = 16


@pytest.fixture
def store(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=C) as s:
        yield s
        assert s.fsck().ok


def _keys(cache):
    return [np.array(c.keys) for c in cache]


@pytest.mark.parametrize("how", ["load", "restore"])
def test_restores_of_different_agents_never_share_memory(store, how):
    """Two agents of the same shapes but different KV, restored one after the other: appending to one
    leaves the other as it was, and each holds its own bytes (restoring the same agent twice would
    hide sharing behind identical bytes)."""
    a, b = make_cache("kv", 3 * C, mx.float16, seed=1), make_cache("kv", 3 * C, mx.float16, seed=2)
    ta, tb = tokens(3 * C, seed=1), tokens(3 * C, seed=2)
    store.save("a", a, ta, model=FP)
    store.save("b", b, tb, model=FP)
    if how == "load":
        ra, rb = store.load("a", model=FP)[0], store.load("b", model=FP)[0]
    else:
        ra, rb = store.restore(ta, model=FP)[0], store.restore(tb, model=FP)[0]
    assert same_cache(a, ra) and same_cache(b, rb)
    before = _keys(rb)
    for c in ra:
        k = mx.full((1, 2, 5, 8), 3.0, dtype=mx.float16)
        c.update_and_fetch(k, k)
        c.keys[..., :4, :] = 7.0  # writes into the restored positions themselves
        mx.eval(c.keys)
    assert all(np.array_equal(x, y) for x, y in zip(before, _keys(rb)))
    assert same_cache(b, rb)
    again = store.load("a", model=FP)[0]
    assert same_cache(a, again)  # the store's bytes were not touched either


@pytest.mark.parametrize(
    "ids", [[0xFFFFFFFF, 0x10000, 65535, 65536, 2**31, 128_255], [2**32 - 1 - i for i in range(40)]]
)
def test_token_ids_up_to_2_to_the_32_minus_1_round_trip(store, ids):
    toks = (ids * (2 * C // len(ids) + 1))[: 2 * C + 3]
    cache = make_cache("kv", len(toks), mx.float16, seed=4)
    store.save("big", cache, toks, model=FP)
    loaded, got = store.load("big", model=FP)
    assert got == toks and same_cache(cache, loaded)
    assert store.tokens("big") == toks
    restored, n = store.restore(toks + [0xFFFFFFFE], model=FP)
    assert n == len(toks) and same_cache(cache, restored)
    # The same ids with the high bits cut off are another sequence: nothing of it is stored.
    assert store.match([t & 0xFFFF for t in toks], model=FP).n_tokens == 0


def test_gc_keeps_labelled_and_pinned_snapshots(store):
    """Snapshots far outside keep_last survive gc when labelled or pinned; the others go."""
    caches = {}
    for i in range(6):
        toks = tokens(2 * C + i, seed=10 + i)
        caches[i] = (make_cache("kv", len(toks), mx.float16, seed=10 + i), toks)
        store.save("a", caches[i][0], toks, model=FP, label="first" if i == 0 else None, pinned=i == 2)
    kept = {s.id: s for s in store.snapshots("a")}
    labelled = next(s.id for s in kept.values() if s.label == "first")
    pinned = next(s.id for s in kept.values() if s.pinned)
    report = store.gc(keep_last=1, grace=0)
    assert report.snapshots_removed == 3  # 1, 3 and 4; 0 (label), 2 (pin) and 5 (head) stay
    assert {s.id for s in store.snapshots("a")} == {labelled, pinned, store.agent("a").head}
    for sid, i in ((labelled, 0), (pinned, 2), (store.agent("a").head, 5)):
        cache, got = store.load("a", model=FP, snapshot=sid)
        assert got == caches[i][1] and same_cache(caches[i][0], cache)
    assert store.fsck(grace=0).ok


def test_keys_differ_when_any_single_token_of_a_chunk_differs():
    toks = tokens(3 * C + 5, seed=7, vocab=50_000)
    base = chunk_keys(FP, toks, C)
    assert len(base) == 4 and len(set(base)) == 4
    for p in range(len(toks)):
        changed = list(toks)
        changed[p] ^= 1 << (p % 32)  # every bit position of the uint32 id takes its turn
        keys = chunk_keys(FP, changed, C)
        first = p // C
        assert keys[:first] == base[:first], p  # chunks before the change keep their keys
        assert all(k != b for k, b in zip(keys[first:], base[first:])), p  # this chunk's and all after differ
    assert chunk_keys("c1" * 16, toks, C)[0] != base[0]  # and another model never shares a key
    assert chunk_keys(FP, toks[:-1], C)[-1] != base[-1]  # nor a shorter tail


def test_default_chunk_size_and_the_parallel_read_path(tmp_path):
    """Chunks of 256 (the default) and a restore of more than scatter.PARALLEL_BYTES, which reads on several threads."""
    layers, heads, dim, n = 8, 8, 128, 1100
    cache = []
    for layer in range(layers):
        c = mlc.KVCache()
        k = mx.random.normal((1, heads, n, dim), key=mx.random.key(layer)).astype(mx.float16)
        c.update_and_fetch(k, -k)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    assert sum(c.keys.nbytes + c.values.nbytes for c in cache) >= scatter.PARALLEL_BYTES
    toks = tokens(n, seed=8, vocab=150_000)
    with kvstore.open(tmp_path / "s") as store:
        assert store.chunk_size == kvstore.DEFAULT_CHUNK_SIZE == 256
        store.save("big", cache, toks, model=FP)
        loaded, got = store.load("big", model=FP)
        assert got == toks and same_cache(cache, loaded)
        restored, m = store.restore(toks[:700] + [1, 2], model=FP)
        assert m == 512  # two whole chunks of 256; the request's third chunk is not stored
        assert all(
            bool(mx.array_equal(r.keys[..., :512, :], c.keys[..., :512, :]).item()) for r, c in zip(restored, cache)
        )
        assert store.fsck().ok


def test_gc_leaves_a_young_unnamed_blob_file_alone(store):
    """A blob file no row names yet is a save in flight until the grace period has passed."""
    store.save("a", make_cache("kv", 2 * C, mx.float16, seed=20), tokens(2 * C, seed=20), model=FP)
    in_flight, _n, written = store.blobs.put([b"written, not yet committed"])
    assert written
    done = store.gc()  # default grace: an hour
    assert done.files_removed == 0 and store.blobs.path(in_flight).exists()
    assert store.fsck().ok  # a young unnamed file is not a problem either
    assert store.gc(grace=0).files_removed == 1 and not store.blobs.path(in_flight).exists()


def test_a_window_piece_that_starts_too_late_is_never_used(store):
    """A sliding layer saved at 38 tokens (window 24) holds positions 14..37: chunk 0 only from 14 on.
    A request for 32 tokens needs positions 8..31, so nothing before 38 can be rebuilt from it."""
    cache = make_cache("rotating", 38, mx.float16, window=24, stepped=True)
    toks = tokens(38, seed=21)
    store.save("r", cache, toks, model=FP)
    assert store.restore(toks, model=FP)[1] == 38
    restored, n = store.restore(toks[:32] + [7], model=FP)
    assert (restored, n) == (None, 0)
    assert store.match(toks[:32], model=FP).n_tokens == 0


def test_a_hash_match_alone_is_never_trusted(tmp_path):
    """Restore compares the stored token ids, not only the chunk keys: a key that names other tokens'
    KV (what a hash collision would do; made here by rewriting the index) restores nothing."""
    import sqlite3

    ta, tb = tokens(2 * C, seed=30), tokens(2 * C, seed=31)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        store.save("a", make_cache("kv", 2 * C, mx.float16, seed=30), ta, model=FP)
    (ka0, ka1), (kb0, kb1) = chunk_keys(FP, ta, C), chunk_keys(FP, tb, C)
    with sqlite3.connect(tmp_path / "s" / "index.db") as conn:  # a's chunks now answer to b's keys
        for old, new in ((ka0, kb0), (ka1, kb1)):
            for table, column in (("chunks", "key"), ("chunk_layers", "chunk_key"), ("snapshot_chunks", "chunk_key")):
                conn.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (new, old))
            conn.execute("UPDATE chunks SET parent = ? WHERE parent = ?", (new, old))
    with kvstore.open(tmp_path / "s") as store:
        assert store.match(tb, model=FP).n_tokens == 0
        assert store.restore(tb + [1], model=FP) == (None, 0)


def test_a_fuller_window_piece_replaces_a_stored_one(tmp_path):
    """Decoded up to 38 tokens a sliding layer (window 24) keeps chunk 0 from position 14; up to 37,
    from 13. The second save must store its fuller piece, or its own snapshot cannot be loaded."""
    import random

    from reliability import synth

    toks = [random.Random(23).randrange(2**32) for _ in range(38)]
    with kvstore.open(tmp_path / "s", chunk_size=synth.CHUNK) as store:
        for n in (38, 37):  # prefill 30 tokens, then decode one at a time (which trims the window)
            cache = synth.make_cache(toks[:30])
            for p in range(30, n):
                synth.extend(cache, toks[:p], toks[: p + 1], random.Random(p))
            store.save(f"r{n}", cache, toks[:n], model=synth.FP)
        for n in (38, 37):
            loaded, got = store.load(f"r{n}", model=synth.FP)
            assert got == toks[:n] and synth.checksum(loaded) == synth.expected_sum(toks[:n])
        assert store.fsck().ok


def test_a_save_whose_reused_chunks_a_gc_removed_meanwhile_writes_them_again(store, monkeypatch):
    """Between a save's plan and its commit a gc removes the chunks it planned to reuse (their only
    agent was deleted): the commit re-checks under the write lock and plans again."""
    from kvstore.ops import save as save_mod  # (start_writes as the save path calls it)

    prefix = tokens(2 * C, seed=40)
    store.save("a", make_cache("kv", 2 * C, mx.float16, seed=40), prefix, model=FP)
    longer = make_cache("kv", 3 * C, mx.float16, seed=40)  # same generator: its first 2 chunks equal a's
    real, calls = save_mod.start_writes, []

    def gc_in_between(*args, **kwargs):
        if not calls:
            store.delete("a")
            assert store.gc(grace=0).chunks_removed == 2
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "start_writes", gc_in_between)
    store.save("b", longer, prefix + tokens(C, seed=41), model=FP)
    assert len(calls) == 2  # planned twice
    loaded, _ = store.load("b", model=FP)
    assert same_cache(longer, loaded)
