"""Hybrid and recurrent models (issue 24, points 1-3): state checkpoints, exact turn boundaries, mamba.

Tiny random-weight models from mlx-lm's own modules (tests/hybrid_models.py): qwen3_next (gated
delta-net + attention), qwen3_5, nemotron_h and falcon_h1 (Mamba-2 mixers + attention; falcon_h1 in
CacheLists), lfm2 (short convolutions + attention) and mamba2 (no attention layer); mamba and rwkv7 in the
pure recurrent test.
"""

from __future__ import annotations

import sqlite3

import mlx.core as mx
import pytest
from hybrid_models import FAMILIES, RECURRENT, build
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore.agents import AgentManager, GenerationOptions, turn
from kvstore.cache import codec
from kvstore.cache.capture import Capture, checkpoint_boundaries
from kvstore.cache.keys import chunk_keys
from kvstore.errors import CorruptBlobError
from kvstore.models.builtin import CORPUS
from kvstore.testing import same_cache

CHUNK = 256
SYSTEM = CORPUS[:4000]  # ~930 tokens with the built-in tokenizer: three whole chunks and a part


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pair(family):
    return build(family)


def _tokens(tokenizer, n_messages: int = 3) -> list[int]:
    """A rendered conversation: the system prompt and a few messages (end-of-turn tokens between)."""
    words = CORPUS.split()
    messages = [{"role": "system", "content": SYSTEM}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(words[i * 20 : i * 20 + 20])}
        for i in range(n_messages)
    ]
    return turn.render(tokenizer, messages)


def _prefill(model, tokens, capture=None):
    """A cache that has seen `tokens`, prefilled as an agent does (chunk-aligned steps, checkpoints)."""
    cache = make_prompt_cache(model)
    turn.prefill(model, cache, tokens, 0, len(tokens), 512, capture)
    return cache


def _logits(model, cache, tokens) -> mx.array:
    out = model(mx.array(tokens)[None], cache=cache)[0, -1]
    mx.eval(out)
    return out


def test_save_load_is_bit_exact(pair, tmp_path):
    model, tokenizer = pair
    tokens = _tokens(tokenizer)
    fp = kvstore.fingerprint(model)
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        for n in (len(tokens), 2 * CHUNK):  # a partial last chunk, and a whole one
            cache = _prefill(model, tokens[:n])
            store.save(f"a{n}", cache, tokens[:n], model=fp)
            loaded, got = store.load(f"a{n}", model=fp)
            assert got == tokens[:n]
            assert same_cache(cache, loaded)
        assert store.fsck().ok


def test_checkpoints_land_on_segment_end_boundaries(pair):
    """The policy: the last chunk boundary at or before each end-of-turn token, inside the prefill."""
    _model, tokenizer = pair
    tokens = _tokens(tokenizer)
    eos = tokenizer.eos_token_ids
    ends = [i + 1 for i, t in enumerate(tokens) if t in eos]
    assert len(ends) == 4  # the system prompt and three messages
    want = sorted({e // CHUNK * CHUNK for e in ends} - {0})
    assert checkpoint_boundaries(tokens, 0, len(tokens), CHUNK, eos) == want
    assert checkpoint_boundaries(tokens, want[0], len(tokens), CHUNK, eos) == want[1:]
    assert checkpoint_boundaries(list(range(1, 9000)), 0, 8999, CHUNK, eos, every=32) == [8192]


def test_prefix_restore_gives_the_logits_of_a_cold_prefill(pair, tmp_path):
    model, tokenizer = pair
    tokens = _tokens(tokenizer)
    fp = kvstore.fingerprint(model)
    capture = Capture(CHUNK, turn_ends=tokenizer.eos_token_ids, states=True)
    cache = _prefill(model, tokens, capture)
    boundaries = capture.boundaries(tokens, 0, len(tokens))
    assert boundaries and {p.chunk for p in capture.pieces.values()} == {b // CHUNK - 1 for b in boundaries}
    other = tokens[: boundaries[-1] + 40] + tokenizer.encode(" a question nobody asked before")
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        store.save("a", cache, tokens, model=fp, captured=capture.pieces)
        restored, n = store.restore(other, model=fp)
        assert n == boundaries[-1]  # the longest boundary with a checkpoint of every state slot
        cold = _logits(model, make_prompt_cache(model), other)
        assert mx.allclose(_logits(model, restored, other[n:]), cold, atol=1e-4).item()
        # A request that stops between two checkpoints lands on the earlier one, never in between.
        restored, n = store.restore(tokens[: boundaries[0] + CHUNK // 2], model=fp)
        assert n == boundaries[0]
        assert store.fsck().ok


def test_a_checkpoint_is_never_restored_at_another_position(pair, tmp_path):
    """The index names the state blob taken at 512 tokens for the boundary at 768: refused, never used."""
    model, tokenizer = pair
    tokens = _tokens(tokenizer)
    fp = kvstore.fingerprint(model)
    capture = Capture(CHUNK, turn_ends=tokenizer.eos_token_ids, states=True)
    with pytest.raises(ValueError, match="chunk boundary"):
        capture.checkpoint(make_prompt_cache(model), 100)
    cache = make_prompt_cache(model)
    for at in (2 * CHUNK, 3 * CHUNK):  # checkpoints at two boundaries
        turn.prefill(model, cache, tokens, at - CHUNK if at > 2 * CHUNK else 0, at, 512, None)
        capture.checkpoint(cache, at)
    turn.prefill(model, cache, tokens, 3 * CHUNK, len(tokens), 512, None)
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        store.save("a", cache, tokens, model=fp, captured=capture.pieces)
        _restored, n = store.restore(tokens[: 3 * CHUNK + 5], model=fp)
        assert n == 3 * CHUNK
        keys = chunk_keys(fp, tokens, CHUNK)
        db = sqlite3.connect(tmp_path / "s" / "index.db")
        states = [i for i, slot in enumerate(codec.describe(make_prompt_cache(model))[1]) if slot.kind == "state"]
        with db:
            for layer in states:
                (at_512,) = db.execute(
                    "SELECT blob_id FROM chunk_layers WHERE chunk_key = ? AND layer = ?", (keys[1], layer)
                ).fetchone()
                db.execute(
                    "UPDATE chunk_layers SET blob_id = ? WHERE chunk_key = ? AND layer = ?", (at_512, keys[2], layer)
                )
        db.close()
        with pytest.raises(CorruptBlobError, match="state after 512 tokens.*position 768"):
            store.restore(tokens[: 3 * CHUNK + 5], model=fp)


def test_a_state_never_reaches_another_model_or_kv_setting(pair, family, tmp_path):
    model, tokenizer = pair
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        with AgentManager(pair, store) as mgr:
            mgr.create("a", system_prompt=SYSTEM).chat("hello there", max_tokens=4)
            prompt = turn.render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])
            assert store.match(prompt, model=mgr.fingerprint).n_tokens >= 3 * CHUNK
        for other in (kvstore.fingerprint(build(family, seed=1)), kvstore.fingerprint(model, kv_bits=8)):
            assert other != mgr.fingerprint
            assert store.match(prompt, model=other).n_tokens == 0
            assert store.restore(prompt, model=other) == (None, 0)
        with AgentManager(build(family, seed=1), store) as mgr:  # same layout, other weights
            reply = mgr.create("b", system_prompt=SYSTEM).chat("hello there", max_tokens=4)
            assert reply.stats.restored_tokens == 0


def _cold_reply(family, message: str, tmp_path) -> tuple:
    with kvstore.open(tmp_path, chunk_size=CHUNK) as store, AgentManager(build(family), store) as mgr:
        return mgr.create("cold", system_prompt=SYSTEM).chat(message, max_tokens=12).tokens


def test_a_second_agent_restores_the_shared_system_prompt(pair, family, tmp_path):
    _model, tokenizer = pair
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store, AgentManager(pair, store) as mgr:
        first = mgr.create("a", system_prompt=SYSTEM).chat("Summarise the report.", max_tokens=12)
        assert first.stats.restored_tokens == 0
        b = mgr.create("b", system_prompt=SYSTEM)
        reply = b.chat("What should we do first?", max_tokens=12)
        mine = turn.render(tokenizer, b.conversation(b.messages[:1]))
        theirs = turn.render(tokenizer, [{"role": "system", "content": SYSTEM}, mgr.get("a").messages[0]])
        whole = turn.common_prefix(mine, theirs) // CHUNK * CHUNK
        assert whole >= 3 * CHUNK
        assert reply.stats.restored_tokens >= 0.9 * whole
        assert reply.tokens == _cold_reply(family, "What should we do first?", tmp_path / "cold")
        assert store.fsck().ok


def test_a_hybrid_turn_prefills_only_the_new_message(pair, tmp_path):
    """The reply's text re-tokenizes to other ids (sampled random ids make that certain): the turn still
    continues the cache, which has seen the generated ids (before: 1,006 of 1,006 prefilled)."""
    _model, tokenizer = pair
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store, AgentManager(pair, store) as mgr:
        a = mgr.create("a", system_prompt=SYSTEM)
        first = a.chat("Summarise the report.", max_tokens=24, temp=1.0, seed=3)
        seen = len(a.tokens)
        assert seen == first.stats.prompt_tokens + len(first.tokens)
        rendered = turn.render(tokenizer, a.conversation(a.messages + [{"role": "user", "content": "x"}]))
        assert turn.common_prefix(rendered, a.tokens) < len(a.tokens)  # the reply re-tokenized differently
        second = a.chat("And then?", max_tokens=12)
        assert second.stats.reused_tokens == seen
        assert second.stats.prefilled_tokens <= 64


def test_a_resumed_agent_prefills_only_its_new_message(pair, family, tmp_path):
    turns = ("Summarise the report.", "Why was it slow?", "What should we do first?")
    with kvstore.open(tmp_path / "u", chunk_size=CHUNK) as store, AgentManager(pair, store) as mgr:
        a = mgr.create("a", system_prompt=SYSTEM)
        uninterrupted = [a.chat(m, max_tokens=12) for m in turns]
    with kvstore.open(tmp_path / "r", chunk_size=CHUNK) as store:
        with AgentManager(pair, store) as mgr:
            a = mgr.create("a", system_prompt=SYSTEM)
            for m in turns[:2]:
                a.chat(m, max_tokens=12)
            seen = len(a.tokens)
        with AgentManager(build(family), store) as mgr:  # a new manager and model object: a restart
            reply = mgr.get("a").chat(turns[2], max_tokens=12)
        assert reply.stats.restored_tokens == seen
        assert reply.stats.prefilled_tokens == reply.stats.prompt_tokens - seen <= 64
        assert reply.tokens == uninterrupted[2].tokens
        assert reply.text == uninterrupted[2].text
        assert store.fsck().ok


@pytest.mark.parametrize("recurrent", RECURRENT)
def test_a_pure_recurrent_turn_keeps_its_reply(recurrent, tmp_path):
    """mamba, mamba2 and rwkv7 have no positional layer: the length comes from the tokens (before: the
    turn raised after generating, "this model's cache has no positional layer", and the reply was lost)."""
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        with AgentManager(build(recurrent), store) as mgr:
            a = mgr.create("a", system_prompt="You are brief.")
            reply = a.chat("hello there", max_tokens=8)
            assert len(reply.tokens) == 8 and a.messages[-1] == {"role": "assistant", "content": reply.text}
            assert len(a.tokens) == reply.stats.prompt_tokens + 8
            assert store.tokens("a") == a.tokens
        with AgentManager(build(recurrent), store) as mgr:
            reply = mgr.get("a").chat("and again", max_tokens=8)
            assert reply.stats.restored_tokens == len(store.tokens("a")) - reply.stats.prefilled_tokens - 8
            assert reply.stats.prefilled_tokens <= 64


def test_continue_exactly_keeps_the_cache_s_own_ids():
    """Ids: 9 is the end-of-turn token. own = system, user, a reply the template re-renders as other ids."""
    eos = [9]
    own = [1, 2, 9, 3, 4, 9, 50, 51, 9]  # the reply 50 51 was generated, then the end-of-turn token
    rendered = [1, 2, 9, 3, 4, 9, 52, 9, 5, 6, 9, 7]  # the same reply re-tokenized as 52, then a new message
    assert turn.continue_exactly(eos, own, rendered) == own + [5, 6, 9, 7]
    cut = own[:-1]  # a reply cut short by max_tokens: no end-of-turn token in the cache yet
    assert turn.continue_exactly(eos, cut, rendered) == cut + [9, 5, 6, 9, 7]
    assert turn.continue_exactly(eos, own, own + [5, 9]) == own + [5, 9]  # already a continuation
    assert turn.continue_exactly(eos, own, [1, 2, 9, 3, 4, 9, 52]) == [1, 2, 9, 3, 4, 9, 52]  # no reply end
    # An earlier reply re-tokenized too: own's k-th end-of-turn token is still the rendered k-th.
    longer = own + [5, 9, 60, 61, 9]
    again = [1, 2, 9, 3, 4, 9, 52, 9, 5, 9, 62, 9, 8, 9, 7]
    assert turn.continue_exactly(eos, longer, again) == longer + [8, 9, 7]


def test_an_edited_reply_is_rendered_not_replaced(tmp_path):
    """A conversation whose last reply was changed (a client editing history) is the caller's, not the
    cache's: its prompt is rendered as given, and the state restarts from a checkpoint before the edit."""
    pair = build("qwen3_next")
    _model, tokenizer = pair
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store, AgentManager(pair, store) as mgr:
        a = mgr.create("a", system_prompt=SYSTEM)
        a.chat("Summarise the report.", max_tokens=12)
        edited = a.messages[:-1] + [{"role": "assistant", "content": "Something else."}]
        messages = edited + [{"role": "user", "content": "And then?"}]
        prompt = turn.render(tokenizer, a.conversation(messages))
        reply = a.respond(prompt, messages, GenerationOptions(max_tokens=4))
        assert reply.stats.prompt_tokens == len(prompt)
        assert a.tokens[: len(prompt)] == prompt
        assert reply.stats.reused_tokens + reply.stats.restored_tokens == 3 * CHUNK  # the system prompt's checkpoint
