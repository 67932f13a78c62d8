"""Shared prefixes are stored once; other models share nothing; incremental saves write only new chunks."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from cachegen import same_cache, tokens
from conftest import TEST_CHUNK

C = TEST_CHUNK
FP_A = "aa" * 16
FP_B = "bb" * 16


def prefix_cache(prefix_kv, private_kv, layers=2):
    """A KVCache list holding a shared prefix's KV then an agent's own."""
    out = []
    for layer in range(layers):
        c = KVCache()
        c.update_and_fetch(*prefix_kv[layer])
        if private_kv is not None:
            c.update_and_fetch(*private_kv[layer])
        out.append(c)
    mx.eval([c.keys for c in out])
    return out


def random_kv(n, seed, layers=2):
    key = mx.random.key(seed)
    out = []
    for _ in range(layers):
        key, a, b = mx.random.split(key, 3)
        out.append((mx.random.normal((1, 2, n, 8), key=a).astype(mx.float16),
                    mx.random.normal((1, 2, n, 8), key=b).astype(mx.float16)))
    return out


def blob_files(store):
    return {b for b, _ in store.blobs.iter_files()}


def test_shared_prefix_shares_blobs_and_other_model_shares_nothing(store):
    shared_tokens = tokens(3 * C, seed=1)
    shared = random_kv(3 * C, seed=1)
    a = prefix_cache(shared, random_kv(5, seed=2))
    b = prefix_cache(shared, random_kv(9, seed=3))
    store.save("a", a, shared_tokens + tokens(5, seed=2), model=FP_A)
    after_a = blob_files(store)
    snap_b = store.save("b", b, shared_tokens + tokens(9, seed=3), model=FP_A)
    after_b = blob_files(store)
    # b wrote only its own tail chunk (one blob holds every layer of a chunk); the 3 shared ones were reused.
    assert snap_b.blobs_written == 1
    assert len(after_b - after_a) == 1
    # The same tokens and KV under another model fingerprint share nothing.
    snap_c = store.save("c", prefix_cache(shared, random_kv(5, seed=2)), shared_tokens + tokens(5, seed=2),
                        model=FP_B)
    # Identical bytes may dedup on disk by content id, but the index shares no chunk between models.
    assert snap_c.n_tokens == 3 * C + 5
    with store.engine.connect() as conn:
        from sqlalchemy import text
        keys_a = {bytes(r[0]) for r in conn.execute(text(
            "SELECT sc.chunk_key FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id "
            "JOIN agents a ON a.id = s.agent_id WHERE a.name = 'a'"))}
        keys_c = {bytes(r[0]) for r in conn.execute(text(
            "SELECT sc.chunk_key FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id "
            "JOIN agents a ON a.id = s.agent_id WHERE a.name = 'c'"))}
    assert keys_a and keys_c and not (keys_a & keys_c)
    assert store.match(shared_tokens + tokens(5, seed=2), model=FP_B).n_tokens == 3 * C + 5
    assert store.match(shared_tokens, model="cc" * 16).n_tokens == 0
    assert store.fsck().ok


def test_eight_agents_store_the_prefix_once(store):
    shared_tokens = tokens(4 * C, seed=7)
    shared = random_kv(4 * C, seed=7)
    unique_bytes = 0
    for i in range(8):
        own = random_kv(C, seed=100 + i)
        store.save(f"agent-{i}", prefix_cache(shared, own), shared_tokens + tokens(C, seed=100 + i), model=FP_A)
        unique_bytes += sum(k.nbytes + v.nbytes for k, v in own)
    unique_bytes += sum(k.nbytes + v.nbytes for k, v in shared)
    stats = store.stats()
    assert stats.blobs == 4 + 8  # 4 shared chunks + 8 private ones, a blob per chunk
    # Each blob is its raw KV plus a safetensors header of a few hundred bytes.
    assert unique_bytes < stats.bytes_on_disk < unique_bytes + stats.blobs * 400
    # One file per agent would hold 8 x 5 chunks; the store holds 12 (all blobs are the same size here).
    assert stats.dedup_ratio == round(8 * 5 / 12, 4)


def test_incremental_save_writes_only_new_chunks(store):
    history = random_kv(6 * C + 3, seed=5)
    toks = tokens(6 * C + 3, seed=5)
    first = store.save("a", prefix_cache(history, None), toks, model=FP_A)
    assert first.blobs_written == 7
    turn = random_kv(C + 4, seed=6)
    longer = prefix_cache(history, turn)
    toks2 = toks + tokens(C + 4, seed=6)
    second = store.save("a", longer, toks2, model=FP_A)
    # The old tail chunk (3 tokens) is rewritten as a full chunk, plus one new partial chunk.
    assert second.blobs_written == 2
    assert second.bytes_written < first.bytes_written / 3
    loaded, got = store.load("a", model=FP_A)
    assert got == toks2 and same_cache(longer, loaded)


def test_match_and_restore_take_the_longest_verified_prefix(store):
    toks = tokens(5 * C, seed=9)
    kv = random_kv(5 * C, seed=9)
    store.save("a", prefix_cache(kv, None), toks, model=FP_A)
    request = toks[: 3 * C + 4] + [999_999] * 10
    m = store.match(request, model=FP_A)
    assert m.n_tokens == 3 * C
    cache, n = store.restore(request, model=FP_A)
    assert n == 3 * C
    expected = prefix_cache([(k[..., : 3 * C, :], v[..., : 3 * C, :]) for k, v in kv], None)
    assert same_cache(expected, cache)
    assert store.restore(request, model=FP_A, max_tokens=2 * C + 1)[1] == 2 * C
    assert store.restore([5, 6, 7], model=FP_A) == (None, 0)


def test_match_finds_a_stored_partial_tail(store):
    """An agent saved mid-chunk is matched to its full length by a longer request (its next turn)."""
    toks = tokens(3 * C + 5, seed=12)
    kv = random_kv(3 * C + 5, seed=12)
    store.save("a", prefix_cache(kv, None), toks, model=FP_A)
    assert store.match(toks + tokens(30, seed=13), model=FP_A).n_tokens == 3 * C + 5
    cache, n = store.restore(toks + tokens(30, seed=13), model=FP_A)
    assert n == 3 * C + 5 and same_cache(prefix_cache(kv, None), cache)
    # A request that differs inside the tail falls back to the last full chunk.
    other = toks[: 3 * C + 2] + [999_999] + toks[3 * C + 3 :] + [1, 2, 3]
    assert store.match(other, model=FP_A).n_tokens == 3 * C
