"""A restore between `delete` and gc: the deleted agent's chunks are still indexed, but no snapshot vouches for
their tokens any more; the longest prefix another agent's snapshot still vouches for is restored."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvstore.testing import make_cache, tokens

FP = "ab" * 16


def test_a_deleted_agents_chunks_do_not_hide_the_prefix_another_agent_shares(store):
    chunk = store.chunk_size
    shared = tokens(3 * chunk)
    a = shared + tokens(2 * chunk, seed=1)
    b = shared + tokens(chunk, seed=2)
    store.save("a", make_cache("kv", len(a), mx.float16), a, model=FP)
    store.save("b", make_cache("kv", len(b), mx.float16), b, model=FP)
    store.delete("a")  # its chunks stay indexed until the next gc
    assert store.match(a, model=FP).n_tokens == 3 * chunk  # before: 0, the longest run had no snapshot
    cache, n = store.restore(a, model=FP)
    assert n == 3 * chunk and cache is not None
    want, _ = store.load("b", model=FP)
    for got, ref in zip(cache, want):
        assert np.array_equal(np.asarray(got.state[0]), np.asarray(ref.state[0][..., :n, :]))
    assert store.fsck().ok
