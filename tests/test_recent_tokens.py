"""A turn's save reads only the token ids its list added (kvstore.cache.recent_tokens, issue 23 point 5),
and gets the ids and chunk keys a whole conversion gets, whatever the caller did to its list."""

from __future__ import annotations

import random

import numpy as np
import pytest

import kvstore
import kvstore.cache.recent_tokens as recent_tokens
from kvstore.cache.keys import chunk_keys, tokens_to_array
from kvstore.cache.recent_tokens import RecentTokens
from kvstore.testing import extend, random_cache

FP = "5e" * 16


def _expected(tokens) -> np.ndarray:
    return tokens_to_array(list(tokens))


def test_every_kind_of_next_list_converts_as_a_whole_conversion_does():
    """Extended, edited, shortened, mutated in place, or with an equal int in place of an id: the ids and
    the chunk keys are the whole conversion's."""
    rng = random.Random(3)
    recent = RecentTokens()
    toks = [rng.randrange(2**32) for _ in range(700)]
    for step in range(300):
        kind = step % 6
        if kind == 0:  # a turn: a new list, longer
            toks = toks + [rng.randrange(2**32) for _ in range(rng.randrange(1, 90))]
        elif kind == 1:  # the caller's own list, appended to in place
            toks.extend(rng.randrange(2**32) for _ in range(rng.randrange(1, 5)))
        elif kind == 2:  # an id edited in the middle, then one added
            toks[rng.randrange(len(toks))] = rng.randrange(2**32)
            toks.append(rng.randrange(2**32))
        elif kind == 3:  # an equal int that is another object, and one more id
            i = rng.randrange(len(toks))
            toks[i] = int(str(toks[i]))
            toks.append(7)
        elif kind == 4:  # shortened (a rewind), or the same list again
            toks = toks[: rng.randrange(len(toks) // 2, len(toks) + 1)]
        else:  # the sentinels' values themselves, as ids after the kept ones
            toks = toks + [0, 2**32 - 1]
        got = recent.convert("a", toks)
        assert got.dtype == np.uint32 and np.array_equal(got, _expected(toks)), step
        size = rng.choice((16, 16, 64))
        assert recent.chunk_keys("a", FP, got, size) == chunk_keys(FP, got, size), step


def test_an_extension_reads_only_the_ids_it_added(monkeypatch):
    """The whole conversion runs for the first list and for one that does not extend it, not for a turn."""
    whole = []
    monkeypatch.setattr(recent_tokens, "tokens_to_array", lambda t: whole.append(len(t)) or tokens_to_array(t))
    recent = RecentTokens()
    toks = list(range(10_000, 12_000))
    recent.convert("a", toks)
    for turn in range(5):
        toks = toks + list(range(turn * 100, turn * 100 + 64))
        assert np.array_equal(recent.convert("a", toks), _expected(toks))
    toks[5] = 1
    recent.convert("a", toks)
    assert whole == [2_000, len(toks)]


@pytest.mark.parametrize(
    "added, error",
    [([1.5], TypeError), ([-1], ValueError), ([2**32], ValueError), (["7"], TypeError), ([3, None], TypeError)],
)
def test_a_bad_id_added_to_a_known_list_is_refused_as_before(added, error):
    recent = RecentTokens()
    toks = list(range(300))
    recent.convert("a", toks)
    with pytest.raises(error):
        recent.convert("a", toks + added)
    with pytest.raises(error):
        tokens_to_array(toks + added)
    assert np.array_equal(recent.convert("a", toks + [5]), _expected(toks + [5]))  # the entry is still sound


def test_ids_of_other_types_are_converted_whole_every_time():
    """NumPy integers, bools and an int subclass convert as before; a list is kept only if it starts and ends
    with a plain int (the ids it adds later must all be plain ints)."""

    class Id(int):
        pass

    recent = RecentTokens()
    for toks in ([np.int64(4), 5, 6], [Id(4), 5, Id(6)], [4, 5, True], [True, 5], [True, False]):
        for given in (toks, toks + [9]):
            try:
                want = _expected(given)
            except TypeError:
                with pytest.raises(TypeError):
                    recent.convert("a", given)
                continue
            assert np.array_equal(recent.convert("a", given), want)
            assert ("a" in recent._entries) == (type(given[0]) is int and type(given[-1]) is int)
        recent._entries.clear()


def test_entries_are_bounded_by_agents_and_by_ids():
    recent = RecentTokens(agents=3, tokens=1_000)
    for i in range(5):
        recent.convert(f"a{i}", list(range(100)))
    assert list(recent._entries) == ["a2", "a3", "a4"]
    recent.convert("a2", list(range(100)) + [1])  # a turn makes it the most recent
    recent.convert("big", list(range(700)))  # a fourth agent: the oldest goes
    assert list(recent._entries) == ["a4", "a2", "big"] and recent._held == 100 + 101 + 700
    recent.convert("more", list(range(300)))  # past 1,000 ids too: the two oldest go
    assert list(recent._entries) == ["big", "more"] and recent._held == 1_000
    recent.convert("huge", list(range(2_000)))  # more than all entries may hold: not kept
    assert recent._entries["huge"].kept is None and recent._held == 1_000


def test_lists_made_again_each_time_are_kept_ever_more_rarely():
    """A server tokenizes each request's whole prompt: its lists hold other int objects every time. They
    convert whole (never compared by value), and after each miss more lists pass before one is kept."""
    values = [random.Random(4).randrange(300, 2**32) for _ in range(2_000)]
    recent = RecentTokens()
    kept = []
    for call in range(40):
        toks = [int(str(v)) for v in values[: 1_000 + call]]  # equal ids, new objects
        assert np.array_equal(recent.convert("a", toks), _expected(toks))
        if recent._entries["a"].kept is not None:
            kept.append(call)
    assert kept == [0, 3, 7, 13, 23]
    hits = []
    for call in range(40, 80):  # a caller that starts extending its list: kept at the next chance, then hits
        toks = toks + [call]
        recent.convert("a", toks)
        hits.append(recent._entries["a"].backoff == 0 and recent._entries["a"].kept is not None)
    assert hits[-10:] == [True] * 10


def test_a_chat_whose_list_grows_saves_and_loads_its_exact_tokens(tmp_path):
    """Through the store: each turn's snapshot holds the ids of the list it was given, an edited one too."""
    chunk = 16
    with kvstore.open(tmp_path / "s", chunk_size=chunk) as store:
        toks = list(range(5_000, 5_040))
        cache = random_cache(len(toks), layers=2, heads=2, dim=8, seed=1)
        store.save("chat", cache, toks, model=FP)
        for turn in range(6):
            extend(cache, 10, seed=turn)
            toks = toks + list(range(9_000 + turn * 10, 9_010 + turn * 10))
            if turn == 3:
                toks[2] = 77  # the caller's list changed under the kept one
            store.save("chat", cache, toks, model=FP)
            _loaded, got = store.load("chat", model=FP)
            assert got == toks
        assert store.match(toks, model=FP).n_tokens == len(toks)
