"""Quantized KV end to end (issue 24, point 5): AgentManager(kv_bits=...) and `kvstore serve --kv-bits`.

Caches are stored quantized (never converted on save), restored bit-exact, shared between agents of
the same model and kv settings, and never mixed with full-precision caches or other kv settings.
The model is the built-in tiny Llama with 64-wide heads (mlx-lm quantizes in groups of 32-128).
"""

from __future__ import annotations

import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import kvstore
from kvstore.agents import AgentManager
from kvstore.models.builtin import CORPUS, build_model
from kvstore.testing import same_cache

CHUNK = 32
SYSTEM = CORPUS[:500]  # about 100 tokens: 3 chunks
KV8 = dict(kv_bits=8, kv_group_size=64, quantized_kv_start=0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_model(tmp_path_factory.mktemp("m") / "llama-h64", arch="llama", head_dim=64))


def _store(tmp_path, name="s"):
    return kvstore.open(tmp_path / name, chunk_size=CHUNK)


def test_a_quantized_cache_is_stored_as_it_is_and_loads_bit_exact(model_path, tmp_path):
    with _store(tmp_path) as store, AgentManager(model_path, store, **KV8) as mgr:
        agent = mgr.create("a", system_prompt=SYSTEM)
        reply = agent.chat("What should we do first?", max_tokens=6)
        live = mgr._resident["a"].cache  # the cache the turn left in memory (as test_agents reads it)
        assert [type(c) for c in live] == [QuantizedKVCache] * 4
        loaded, tokens = store.load("a", model=mgr.fingerprint)
        assert tokens == agent.tokens
        assert [(type(c), c.bits, c.group_size) for c in loaded] == [(QuantizedKVCache, 8, 64)] * 4
        assert same_cache(loaded, live)
        assert store.agent("a").model == mgr.fingerprint
        assert store.fsck().ok
    # 8-bit KV with 64-wide heads: 64 bytes and a scale and bias (4 bytes each) per head and token,
    # against 256 bytes in float32, so the same conversation writes about 3.5x fewer bytes.
    with _store(tmp_path, "plain") as store, AgentManager(model_path, store) as mgr:
        plain = mgr.create("a", system_prompt=SYSTEM).chat("What should we do first?", max_tokens=6)
    assert plain.stats.bytes_saved > 3 * reply.stats.bytes_saved


def test_agents_of_the_same_settings_share_a_prefix_and_reply_as_a_cold_start(model_path, tmp_path):
    with _store(tmp_path) as store, AgentManager(model_path, store, **KV8) as mgr:
        mgr.create("first", system_prompt=SYSTEM).chat("What should we do first?", max_tokens=6)
        warm = mgr.create("second", system_prompt=SYSTEM).chat("Summarise the incident.", max_tokens=8)
    with _store(tmp_path, "cold") as store, AgentManager(model_path, store, **KV8) as mgr:
        cold = mgr.create("second", system_prompt=SYSTEM).chat("Summarise the incident.", max_tokens=8)
    assert warm.stats.restored_tokens >= 3 * CHUNK
    assert cold.stats.restored_tokens == 0
    assert warm.tokens == cold.tokens


def test_a_resumed_quantized_agent_replies_as_an_uninterrupted_one(model_path, tmp_path):
    turns = ("What should we do first?", "And then?")
    with _store(tmp_path) as store:
        with AgentManager(model_path, store, **KV8) as mgr:
            mgr.create("a", system_prompt=SYSTEM).chat(turns[0], max_tokens=6)
        with AgentManager(model_path, store, **KV8) as mgr:
            resumed = mgr.get("a").chat(turns[1], max_tokens=8)
    with _store(tmp_path, "one") as store, AgentManager(model_path, store, **KV8) as mgr:
        agent = mgr.create("a", system_prompt=SYSTEM)
        agent.chat(turns[0], max_tokens=6)
        uninterrupted = agent.chat(turns[1], max_tokens=8)
    assert resumed.stats.restored_tokens > 3 * CHUNK
    assert resumed.stats.prefilled_tokens == uninterrupted.stats.prefilled_tokens <= 64  # the new message
    assert resumed.tokens == uninterrupted.tokens


@pytest.mark.parametrize(
    "other",
    [
        {},
        dict(kv_bits=4, kv_group_size=64, quantized_kv_start=0),
        dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
    ],
    ids=["full-precision", "4-bit", "group-32"],
)
def test_caches_of_other_kv_settings_never_mix(model_path, tmp_path, other):
    """Both ways: neither side restores a single token of the other's caches, nor loads its agents."""
    with _store(tmp_path) as store:
        with AgentManager(model_path, store, **KV8) as q8, AgentManager(model_path, store, **other) as mgr:
            assert q8.fingerprint not in mgr.fingerprints and mgr.fingerprint not in q8.fingerprints
            q8.create("q", system_prompt=SYSTEM).chat("What should we do first?", max_tokens=4)
            theirs = mgr.create("o", system_prompt=SYSTEM).chat("What should we do first?", max_tokens=4)
            assert theirs.stats.restored_tokens == 0
            ours = q8.create("q2", system_prompt=SYSTEM).chat("Summarise the incident.", max_tokens=4)
            assert ours.stats.restored_tokens >= 3 * CHUNK  # from "q", never from "o"
            with pytest.raises(kvstore.ModelMismatchError):
                mgr.get("q")
            with pytest.raises(kvstore.ModelMismatchError):
                q8.get("o")
            with pytest.raises(kvstore.ModelMismatchError):
                store.load("q", model=mgr.fingerprint)
            other_kind = QuantizedKVCache if other else KVCache
            assert all(type(c) is other_kind for c in store.load("o", model=mgr.fingerprint)[0])
        assert store.fsck().ok


def test_an_agent_crossing_quantized_kv_start_is_stored_full_precision_then_quantized(model_path, tmp_path):
    kv = dict(kv_bits=8, kv_group_size=64, quantized_kv_start=3 * CHUNK)
    turns = ("Hello.", SYSTEM, "And then?")
    with _store(tmp_path) as store:
        with AgentManager(model_path, store, **kv) as mgr:
            full, quantized = mgr.fingerprints[1], mgr.fingerprint
            agent = mgr.create("a", system_prompt="Be brief.")
            agent.chat(turns[0], max_tokens=4)
            assert len(agent.tokens) < kv["quantized_kv_start"]
            assert store.agent("a").model == full  # below quantized_kv_start: full precision, as mlx-lm
            assert all(type(c) is KVCache for c in store.load("a", model=full)[0])
        with AgentManager(model_path, store, **kv) as mgr:  # resumed below the start
            agent = mgr.get("a")
            agent.chat(turns[1], max_tokens=4)
            assert len(agent.tokens) > kv["quantized_kv_start"]
            assert store.agent("a").model == quantized  # moved, its snapshots kept
            assert all(type(c) is QuantizedKVCache for c in store.load("a", model=quantized)[0])
            assert store.agent("a").snapshots >= 3
        with AgentManager(model_path, store, **kv) as mgr:
            resumed = mgr.get("a").chat(turns[2], max_tokens=6)
        assert store.fsck().ok
    with _store(tmp_path, "one") as store, AgentManager(model_path, store, **kv) as mgr:
        agent = mgr.create("a", system_prompt="Be brief.")
        for t in turns[:2]:
            agent.chat(t, max_tokens=4)
        uninterrupted = agent.chat(turns[2], max_tokens=6)
    assert resumed.tokens == uninterrupted.tokens


def test_models_mlx_lm_cannot_quantize_are_refused_up_front(tmp_path, model_path):
    with _store(tmp_path) as store:
        gemma = build_model(tmp_path / "gemma3", arch="gemma3")
        with pytest.raises(kvstore.UnsupportedCacheError, match="sliding-window"):
            AgentManager(str(gemma), store, kv_bits=8, kv_group_size=32)
        narrow = build_model(tmp_path / "llama-h16", arch="llama")  # 16-wide heads
        with pytest.raises(kvstore.UnsupportedCacheError, match="does not divide"):
            AgentManager(str(narrow), store, kv_bits=8, kv_group_size=64)
        with pytest.raises(ValueError, match="kv_bits must be one of"):
            AgentManager(model_path, store, kv_bits=7)


@pytest.mark.slow  # three server processes: about a minute
def test_kvstore_serve_kv_bits_stores_quantized_conversations_and_resumes_them_after_sigkill(model_path, tmp_path):
    import signal

    pytest.importorskip("openai")
    from server_process import ServerProcess, conversation, new_store

    args = ("--kv-bits", "8", "--kv-group-size", "64", "--quantized-kv-start", "0")
    store_path = new_store(tmp_path / "served")
    srv = ServerProcess(model_path, store_path, *args).start()
    try:
        client = srv.openai()
        msgs = [{"role": "system", "content": SYSTEM}]
        for i in range(2):
            msgs.append({"role": "user", "content": f"Question number {i}: what next?"})
            r = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=10)
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        assert r.usage.prompt_tokens_details.cached_tokens >= 3 * 16
    finally:
        srv.stop(signal.SIGKILL)
    srv = ServerProcess(model_path, store_path, *args).start()
    try:
        msgs.append({"role": "user", "content": "Question number 2: what next?"})
        third = srv.openai().chat.completions.create(model=model_path, messages=msgs, max_tokens=10)
    finally:
        srv.stop()
    ref = ServerProcess(model_path, new_store(tmp_path / "ref"), *args).start()
    try:
        replies = conversation(ref.openai(), model_path, 3, system=SYSTEM)
    finally:
        ref.stop()
    assert third.choices[0].message.content == replies[2][0]
    cached = third.usage.prompt_tokens_details.cached_tokens  # from disk: the killed server's memory is gone
    assert cached == replies[2][1].prompt_tokens_details.cached_tokens >= third.usage.prompt_tokens - 32
    quantized = kvstore.fingerprint(model_path, kv_bits=8, kv_group_size=64, quantized_kv_start=0)
    with kvstore.open(store_path) as store:
        conversations = store.agents()
        assert conversations and {a.model for a in conversations} == {quantized}
        cache, _tokens = store.load(conversations[0].name, model=quantized)
        assert all(type(c) is QuantizedKVCache and c.bits == 8 for c in cache)
        assert store.fsck().ok
