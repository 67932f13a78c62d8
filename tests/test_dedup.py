"""Shared prefixes are stored once; other models share nothing; incremental saves write only new chunks."""

from __future__ import annotations

from conftest import TEST_CHUNK

from kvstore.testing import extend, random_cache, same_cache, tokens

C = TEST_CHUNK
FP_A = "aa" * 16
FP_B = "bb" * 16


def prefix_cache(n_prefix: int, prefix_seed: int, n_own: int = 0, own_seed: int = 0) -> list:
    """A shared prefix's KV (equal seeds give equal arrays), then an agent's own n_own positions."""
    cache = random_cache(n_prefix, seed=prefix_seed)
    return extend(cache, n_own, own_seed) if n_own else cache


def kv_nbytes(cache: list) -> int:
    return sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache)


def head(cache: list, n: int) -> list:
    """A new cache holding the first n positions of `cache`."""
    out = random_cache(0, layers=len(cache))
    for c, src in zip(out, cache):
        c.update_and_fetch(src.keys[..., :n, :], src.values[..., :n, :])
    return out


def blob_files(store):
    return {b for b, _ in store.blobs.iter_files()}


def test_shared_prefix_shares_blobs_and_other_model_shares_nothing(store):
    shared_tokens = tokens(3 * C, seed=1)
    a = prefix_cache(3 * C, 1, 5, 2)
    b = prefix_cache(3 * C, 1, 9, 3)
    store.save("a", a, shared_tokens + tokens(5, seed=2), model=FP_A)
    after_a = blob_files(store)
    snap_b = store.save("b", b, shared_tokens + tokens(9, seed=3), model=FP_A)
    after_b = blob_files(store)
    # b wrote only its own tail chunk (one blob holds every layer of a chunk); the 3 shared ones were reused.
    assert snap_b.blobs_written == 1
    assert len(after_b - after_a) == 1
    # The same tokens and KV under another model fingerprint share nothing.
    snap_c = store.save("c", prefix_cache(3 * C, 1, 5, 2), shared_tokens + tokens(5, seed=2), model=FP_B)
    # Identical bytes may dedup on disk by content id, but the index shares no chunk between models.
    assert snap_c.n_tokens == 3 * C + 5
    with store.engine.connect() as conn:
        from sqlalchemy import text

        keys_a = {
            bytes(r[0])
            for r in conn.execute(
                text(
                    "SELECT sc.chunk_key FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id "
                    "JOIN agents a ON a.id = s.agent_id WHERE a.name = 'a'"
                )
            )
        }
        keys_c = {
            bytes(r[0])
            for r in conn.execute(
                text(
                    "SELECT sc.chunk_key FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id "
                    "JOIN agents a ON a.id = s.agent_id WHERE a.name = 'c'"
                )
            )
        }
    assert keys_a and keys_c and not (keys_a & keys_c)
    assert store.match(shared_tokens + tokens(5, seed=2), model=FP_B).n_tokens == 3 * C + 5
    assert store.match(shared_tokens, model="cc" * 16).n_tokens == 0
    assert store.fsck().ok


def test_eight_agents_store_the_prefix_once(store):
    shared_tokens = tokens(4 * C, seed=7)
    for i in range(8):
        store.save(
            f"agent-{i}", prefix_cache(4 * C, 7, C, 100 + i), shared_tokens + tokens(C, seed=100 + i), model=FP_A
        )
    unique_bytes = kv_nbytes(random_cache(4 * C)) + 8 * kv_nbytes(random_cache(C))
    stats = store.stats()
    assert stats.blobs == 4 + 8  # 4 shared chunks + 8 private ones, a blob per chunk
    # Each blob is its raw KV plus a safetensors header of a few hundred bytes.
    assert unique_bytes < stats.bytes_on_disk < unique_bytes + stats.blobs * 400
    # One file per agent would hold 8 x 5 chunks; the store holds 12 (all blobs are the same size here).
    assert stats.dedup_ratio == round(8 * 5 / 12, 4)


def test_incremental_save_writes_only_new_chunks(store):
    toks = tokens(6 * C + 3, seed=5)
    first = store.save("a", prefix_cache(6 * C + 3, 5), toks, model=FP_A)
    assert first.blobs_written == 7
    longer = prefix_cache(6 * C + 3, 5, C + 4, 6)
    toks2 = toks + tokens(C + 4, seed=6)
    second = store.save("a", longer, toks2, model=FP_A)
    # The old tail chunk (3 tokens) is rewritten as a full chunk, plus one new partial chunk.
    assert second.blobs_written == 2
    assert second.bytes_written < first.bytes_written / 3
    loaded, got = store.load("a", model=FP_A)
    assert got == toks2 and same_cache(longer, loaded)


def test_match_and_restore_take_the_longest_verified_prefix(store):
    toks = tokens(5 * C, seed=9)
    full = prefix_cache(5 * C, 9)
    store.save("a", full, toks, model=FP_A)
    request = toks[: 3 * C + 4] + [999_999] * 10
    m = store.match(request, model=FP_A)
    assert m.n_tokens == 3 * C
    cache, n = store.restore(request, model=FP_A)
    assert n == 3 * C
    assert same_cache(head(full, 3 * C), cache)
    assert store.restore(request, model=FP_A, max_tokens=2 * C + 1)[1] == 2 * C
    assert store.restore([5, 6, 7], model=FP_A) == (None, 0)


def test_match_finds_a_stored_partial_tail(store):
    """An agent saved mid-chunk is matched to its full length by a longer request (its next turn)."""
    toks = tokens(3 * C + 5, seed=12)
    store.save("a", prefix_cache(3 * C + 5, 12), toks, model=FP_A)
    assert store.match(toks + tokens(30, seed=13), model=FP_A).n_tokens == 3 * C + 5
    cache, n = store.restore(toks + tokens(30, seed=13), model=FP_A)
    assert n == 3 * C + 5 and same_cache(prefix_cache(3 * C + 5, 12), cache)
    # A request that differs inside the tail falls back to the last full chunk.
    other = toks[: 3 * C + 2] + [999_999] + toks[3 * C + 3 :] + [1, 2, 3]
    assert store.match(other, model=FP_A).n_tokens == 3 * C
