"""On the built-in Llama and Gemma-style models, a restored cache is as good as a cold prefill (issue 2)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore.cache.capture import Capture
from kvstore.models.builtin import builtin_model_path, load_builtin
from kvstore.testing import tokens

C = 16


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """Built models go under pytest's temporary folder, never into the user's home (~/.cache)."""
    return tmp_path_factory.mktemp("builtin-models")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, models_root):
    m, tok = load_builtin(request.param, root=models_root)
    return request.param, m, kvstore.fingerprint(builtin_model_path(request.param, root=models_root))


def prefill(m, cache, toks, step=None, capture=None):
    """Run toks through the model into cache (in steps of `step`); return the last position's logits."""
    step = step or len(toks)
    out = None
    for i in range(0, len(toks), step):
        out = m(mx.array(toks[i : i + step])[None], cache=cache)
        mx.eval(out, [c.state for c in cache])
        if capture is not None:
            capture.take(cache)
    return out[0, -1]


def greedy(m, cache, logits, n=16):
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits).item())
        out.append(tok)
        logits = m(mx.array([[tok]]), cache=cache)[0, -1]
    return out


def test_restore_equals_cold_prefill(tmp_path, model):
    arch, m, fp = model
    toks = tokens(150, seed=1, vocab=400)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        saved = make_prompt_cache(m)
        prefill(m, saved, toks[:-1])
        store.save("a", saved, toks[:-1], model=fp)
        restored, n = store.restore(toks, model=fp)
        assert n == 149
        cold = make_prompt_cache(m)
        cold_logits = prefill(m, cold, toks[:n])
        cold_logits = prefill(m, cold, toks[n:])
        warm_logits = prefill(m, restored, toks[n:])
        assert bool(mx.array_equal(cold_logits, warm_logits).item())
        # Against one prefill of every token (another batching): equal within float tolerance.
        once = prefill(m, make_prompt_cache(m), toks)
        assert bool(mx.allclose(once, warm_logits, atol=1e-4, rtol=1e-4).item())
        assert greedy(m, restored, warm_logits) == greedy(m, cold, cold_logits)
        assert store.fsck().ok


def test_load_after_the_window_rotated(tmp_path, model):
    """A cache filled by steps and decoding (its sliding layers wrapped) loads and continues identically."""
    arch, m, fp = model
    toks = tokens(130, seed=2, vocab=400)
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        live = make_prompt_cache(m)
        logits = prefill(m, live, toks[:100], step=7)
        for t in toks[100:]:
            logits = m(mx.array([[t]]), cache=live)[0, -1]
        store.save("a", live, toks, model=fp)
        loaded, got = store.load("a", model=fp)
        assert got == toks
        assert greedy(m, loaded, logits) == greedy(m, live, logits)


def test_sliding_window_prefix_rebuilds_only_with_capture(tmp_path, model):
    """A finished Gemma-style cache holds only its window; chunks captured in passing rebuild any boundary."""
    arch, m, fp = model
    toks = tokens(160, seed=3, vocab=400)
    other = toks[:96] + tokens(40, seed=4, vocab=400)  # shares 6 chunks with toks
    with (
        kvstore.open(tmp_path / "plain", chunk_size=C) as plain,
        kvstore.open(tmp_path / "captured", chunk_size=C) as captured,
    ):
        live = make_prompt_cache(m)
        capture = Capture(C)
        prefill(m, live, toks[:128], step=C, capture=capture)
        for t in toks[128:]:  # decode: the sliding layers now hold only their last window
            m(mx.array([[t]]), cache=live)
        plain.save("a", live, toks, model=fp)
        captured.save("a", live, toks, model=fp, captured=capture.pieces)
        n_plain = plain.match(other, model=fp).n_tokens
        n_captured = captured.match(other, model=fp).n_tokens
        assert n_captured == 96
        if arch == "gemma3":
            assert n_plain == 0  # the window at 96 reaches back into chunks the finished cache no longer holds
        else:
            assert n_plain == 96
        restored, n = captured.restore(other, model=fp)
        cold = make_prompt_cache(m)
        prefill(m, cold, other[:n], step=C)
        a = prefill(m, cold, other[n:])
        b = prefill(m, restored, other[n:])
        assert bool(mx.allclose(a, b, atol=1e-5, rtol=1e-5).item())
        assert greedy(m, restored, b) == greedy(m, cold, a)
        assert captured.fsck().ok
