"""kvstore.generate and the cache helpers, on the built-in model and a real store (issue 17)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import stream_generate
from mlx_lm.models.cache import KVCache, make_prompt_cache

import kvstore
from kvstore.models.builtin import builtin_model_path, load_builtin


@pytest.fixture(scope="module")
def lm():
    return load_builtin()


@pytest.fixture(scope="module")
def fp():
    return kvstore.fingerprint(builtin_model_path())


def _prompt(tokenizer, text="The refund endpoint returns 500 since this morning. " * 3):
    return tokenizer.encode(text)


def test_generate_returns_the_tokens_the_cache_has_seen(lm, tmp_path, fp):
    model, tokenizer = lm
    prompt = _prompt(tokenizer)
    text, cache, seen = kvstore.generate(model, tokenizer, prompt, max_tokens=8)
    assert seen[: len(prompt)] == prompt
    assert len(seen) == kvstore.cache_tokens(cache) == kvstore.check_cache(cache, seen)
    assert len(seen) > len(prompt)
    # The same greedy generation through mlx-lm gives the same text.
    expected = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert text == expected
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        snap = store.save("notes", cache, seen, model=fp)
        assert snap.n_tokens == len(seen)
        assert store.tokens("notes") == seen
        assert store.fsck().ok


def test_continuing_a_restored_cache_prefills_only_the_rest(lm, tmp_path, fp):
    """generate(cache=restored) equals a cold generation over the whole prompt (greedy)."""
    model, tokenizer = lm
    _, cache, seen = kvstore.generate(model, tokenizer, _prompt(tokenizer), max_tokens=6)
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("notes", cache, seen, model=fp)
        restored, stored = store.load("notes", model=fp)
    more = stored + tokenizer.encode(" What should we check first?", add_special_tokens=False)
    warm_text, warm_cache, warm_seen = kvstore.generate(
        model, tokenizer, more, cache=restored, cache_tokens=stored, max_tokens=6
    )
    cold_text, _, cold_seen = kvstore.generate(model, tokenizer, more, max_tokens=6)
    assert warm_seen == cold_seen
    assert warm_text == cold_text
    assert warm_cache is restored


def test_text_continuing_a_cache_adds_no_second_bos(lm):
    model, tokenizer = lm
    _, cache, seen = kvstore.generate(model, tokenizer, _prompt(tokenizer), max_tokens=3)
    _, _, after = kvstore.generate(model, tokenizer, " and then?", cache=cache, cache_tokens=seen, max_tokens=3)
    assert after[: len(seen)] == seen
    assert after[len(seen) : len(seen) + 3] == tokenizer.encode(" and then?", add_special_tokens=False)[:3]


def test_a_prompt_that_does_not_extend_the_cache_is_refused(lm):
    """mlx-lm would prefill the prefix a second time; kvstore says what is wrong instead."""
    model, tokenizer = lm
    prompt = _prompt(tokenizer)
    _, cache, seen = kvstore.generate(model, tokenizer, prompt, max_tokens=3)
    offset = kvstore.cache_tokens(cache)
    other = list(reversed(seen))
    with pytest.raises(kvstore.TokenMismatchError, match="does not extend"):
        kvstore.generate(model, tokenizer, other, cache=cache, cache_tokens=seen)
    with pytest.raises(kvstore.TokenMismatchError, match="cache_tokens="):
        kvstore.generate(model, tokenizer, prompt, cache=cache)
    with pytest.raises(kvstore.TokenMismatchError, match="cache_tokens has"):
        kvstore.generate(model, tokenizer, seen, cache=cache, cache_tokens=seen[:-1])
    assert kvstore.cache_tokens(cache) == offset  # nothing was fed to the model


def test_the_same_prompt_again_steps_back_one_token(lm):
    model, tokenizer = lm
    _, cache, seen = kvstore.generate(model, tokenizer, _prompt(tokenizer), max_tokens=4)
    _, _, again = kvstore.generate(model, tokenizer, seen, cache=cache, cache_tokens=seen, max_tokens=2)
    assert again[: len(seen)] == seen and len(again) > len(seen)


def test_cache_helpers(lm):
    model, _ = lm
    cache = make_prompt_cache(model)
    assert kvstore.cache_tokens(cache) == 0 and kvstore.cache_nbytes(cache) == 0
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    mx.eval([c.state for c in cache])
    assert kvstore.cache_tokens(cache) == 5
    assert kvstore.cache_nbytes(cache) == sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert kvstore.check_cache(cache, [1, 2, 3, 4, 5]) == 5
    with pytest.raises(kvstore.TokenMismatchError):
        kvstore.check_cache(cache, [1, 2, 3])
    cache[1].offset = 4
    with pytest.raises(kvstore.StoreError, match="different numbers"):
        kvstore.cache_tokens(cache)

    class Custom(KVCache):
        pass

    with pytest.raises(kvstore.UnsupportedCacheError):
        kvstore.check_cache([Custom()])


def test_snapshots_report_the_bytes_each_save_wrote(lm, tmp_path, fp):
    """store.snapshots() gives each snapshot's bytes_written as its save reported it (was always 0)."""
    model, tokenizer = lm
    prompt = _prompt(tokenizer, "A shared preamble about refunds and ledgers. " * 6)
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        saved = []
        _, cache, seen = kvstore.generate(model, tokenizer, prompt, max_tokens=4)
        saved.append(store.save("a", cache, seen, model=fp))
        more = seen + tokenizer.encode(" next", add_special_tokens=False)
        _, cache, seen = kvstore.generate(model, tokenizer, more, cache=cache, cache_tokens=seen, max_tokens=4)
        saved.append(store.save("a", cache, seen, model=fp))
        listed = store.snapshots("a")
        assert [s.bytes_written for s in listed] == [s.bytes_written for s in saved]
        assert all(s.bytes_written > 0 for s in listed)


def test_agent_bytes_in_the_public_api(tmp_path):
    from kvstore.testing import make_cache, tokens

    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        prefix = tokens(48, seed=1)
        a, b = prefix + tokens(20, seed=2), prefix + tokens(5, seed=3)
        store.save("a", make_cache("kv", len(a), seed=2), a, model="c1" * 16)
        store.save("b", make_cache("kv", len(b), seed=3), b, model="c1" * 16)
        got = store.agent_bytes()
        assert set(got) == {"a", "b"}
        for _name, nb in got.items():
            assert nb.unique_bytes > 0 and nb.shared_bytes > 0
            assert nb.total_bytes == nb.unique_bytes + nb.shared_bytes
        assert got["a"].shared_bytes == got["b"].shared_bytes
        assert sum(nb.total_bytes for nb in got.values()) == store.stats().logical_bytes
        assert store.agent_bytes("b") == {"b": got["b"]}
        with pytest.raises(kvstore.UnknownAgentError):
            store.agent_bytes("nobody")
