"""Sliding-window (Gemma-3-style) caches saved with `store.save` after an ordinary prefill (issue 15, item 3).

Such a save holds only the last window of each sliding layer, so no earlier chunk boundary can be
rebuilt; a longer request must still restore the saved snapshot at its exact length, and the save
says once that earlier boundaries are lost.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore.models.builtin import build_model

WINDOW, CHUNK, N = 32, 256, 377


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import mlx_lm

    path = build_model(tmp_path_factory.mktemp("gemma") / "gemma3-w32", arch="gemma3", sliding_window=WINDOW)
    model, _tokenizer = mlx_lm.load(str(path))
    return model, kvstore.fingerprint(path)


def prefill(model, tokens, steps: int = 0):
    """A cache that has seen `tokens`: one prefill, then the last `steps` tokens one at a time as
    generation feeds them (which trims each rotating buffer to its window)."""
    cache = make_prompt_cache(model)
    cut = len(tokens) - steps
    logits = model(mx.array(tokens[:cut])[None], cache=cache)
    for t in tokens[cut:]:
        logits = model(mx.array([[t]]), cache=cache)
    mx.eval(logits)
    return cache, logits[0, -1]


def test_a_continuation_restores_the_saved_snapshot_at_its_length(gemma, tmp_path):
    model, fp = gemma
    rng = np.random.default_rng(15)
    tokens = rng.integers(1, 200, size=N).tolist()
    more = tokens + rng.integers(1, 200, size=3).tolist()
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        cache, _ = prefill(model, tokens, steps=3)
        with pytest.warns(kvstore.WindowNotCapturedWarning, match=f"only at exactly {N} tokens"):
            store.save("g", cache, tokens, model=fp)
        _cache, n = store.restore(tokens, model=fp)
        assert n == N
        restored, n = store.restore(more, model=fp)
        assert n == N  # the stored partial tail, found from a boundary no sliding layer can rebuild
        logits = model(mx.array(more[N:])[None], cache=restored)[0, -1]
        _cold, want = prefill(model, more)
        assert mx.allclose(logits, want, atol=1e-4).item()
        # The warning is said once per store and model, not on every save.
        with warnings.catch_warnings():
            warnings.simplefilter("error", kvstore.WindowNotCapturedWarning)
            store.save("g2", prefill(model, more, steps=3)[0], more, model=fp)
        assert store.fsck().ok


def test_a_save_that_captured_its_window_chunks_does_not_warn(gemma, tmp_path):
    model, fp = gemma
    tokens = np.random.default_rng(16).integers(1, 200, size=40).tolist()  # one partial chunk: nothing left
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store, warnings.catch_warnings():
        warnings.simplefilter("error", kvstore.WindowNotCapturedWarning)
        store.save("g", prefill(model, tokens)[0], tokens, model=fp)
        assert store.restore(tokens + [5, 6], model=fp)[1] == 40
        assert store.fsck().ok
