"""The family matrix (issue 24, point 7): every built-in model family, each with its own mlx-lm cache
classes, through the four things kvstore promises.

1. a save/load round trip is bit-exact;
2. a prefix restore gives the next-token logits of a cold prefill;
3. a second agent sharing a system prompt of >= 3 chunks restores at least its whole shared chunks
   and replies as a cold start does;
4. an agent resumed by a new AgentManager prefills only its new message and replies as an
   uninterrupted one.

Recurrent (ArraysCache) families pass 2-4 only with recurrent-state checkpoints (branch `hybrid`):
those params are strict xfails until then. Small chunks (32 tokens) keep the prompts short.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore.agents import AgentManager
from kvstore.agents.turn import common_prefix, render
from kvstore.cache.capture import Capture
from kvstore.models.builtin import ARCHITECTURES, CORPUS, build_model
from kvstore.models.builtin_families import FAMILIES
from kvstore.testing import same_cache

CHUNK = 32  # tokens per chunk; the tiny models' windows (sliding, attention chunk) are 64
SYSTEM = CORPUS[:700]  # about 150 tokens: more than 3 chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (model folder, (model, tokenizer), fingerprint), built once per module."""
    import mlx_lm

    out = {}

    def get(arch):
        if arch not in out:
            path = build_model(tmp_path_factory.mktemp(arch) / arch, arch=arch)
            out[arch] = (path, mlx_lm.load(str(path)), kvstore.fingerprint(path))
        return out[arch]

    return get


def _prefill(model, tokens, capture=None):
    """A cache that has seen `tokens`, fed in chunk-aligned steps (capturing window chunks and state checkpoints)."""
    cache = model.make_cache()
    logits = None
    for pos in range(0, len(tokens), CHUNK):
        logits = model(mx.array(tokens[pos : pos + CHUNK])[None], cache=cache)
        mx.eval(logits)
        if capture is not None:
            capture.take(cache)
            if pos + CHUNK <= len(tokens) and "state" in Capture.kinds(cache):
                capture.checkpoint(cache, pos + CHUNK)  # a recurrent state is restorable only where copied
    return cache, logits[0, -1]


def _tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 900, size=n).tolist()


def test_every_family_is_in_the_matrix():
    assert {c for _fn, classes in FAMILIES.values() for c in classes} >= {
        "KVCache",
        "RotatingKVCache",
        "ChunkedKVCache",
        "ArraysCache",
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_bit_exact(models, tmp_path, arch):
    _path, (model, _tok), fp = models(arch)
    tokens = _tokens(1, 3 * CHUNK + 7)
    capture = Capture(CHUNK)
    cache, _ = _prefill(model, tokens, capture)
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        store.save("a", cache, tokens, model=fp, captured=capture.pieces)
        loaded, toks = store.load("a", model=fp)
        assert toks == tokens
        assert same_cache(loaded, cache)
        assert store.fsck().ok


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_an_archive_round_trip_is_bit_exact(models, tmp_path, arch):
    """`kvstore export` / `import` check each layout slot against the classes kvstore stores."""
    _path, (model, _tok), fp = models(arch)
    tokens = _tokens(4, 2 * CHUNK + 5)
    capture = Capture(CHUNK)
    cache, _ = _prefill(model, tokens, capture)
    with kvstore.open(tmp_path / "a", chunk_size=CHUNK) as src:
        src.save("a", cache, tokens, model=fp, captured=capture.pieces)
        kvstore.export_agent(src, "a", tmp_path / "a.tar")
    with kvstore.open(tmp_path / "b", chunk_size=CHUNK) as dst:
        kvstore.import_agent(dst, tmp_path / "a.tar")
        loaded, toks = dst.load("a", model=fp)
        assert toks == tokens
        assert same_cache(loaded, cache)
        assert dst.fsck().ok


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_restore_matches_a_cold_prefill(models, tmp_path, arch):
    _path, (model, _tok), fp = models(arch)
    tokens = _tokens(2, 3 * CHUNK + 7)
    longer = tokens[: 3 * CHUNK] + _tokens(3, 20)  # shares 3 whole chunks, then differs
    capture = Capture(CHUNK)
    cache, _ = _prefill(model, tokens, capture)
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        store.save("a", cache, tokens, model=fp, captured=capture.pieces)
        restored, n = store.restore(longer, model=fp)
        assert n == 3 * CHUNK
        logits = model(mx.array(longer[n:])[None], cache=restored)[0, -1]
        _cold_cache, cold = _prefill(model, longer)
        assert mx.allclose(logits, cold, atol=1e-4).item()
        assert store.fsck().ok


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_an_agent_sharing_a_system_prompt_starts_warm(models, tmp_path, arch):
    path, _loaded, _fp = models(arch)
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store, AgentManager(str(path), store) as mgr:
        mgr.create("first", system_prompt=SYSTEM).chat("What should we do first?", max_tokens=6)
        second = mgr.create("second", system_prompt=SYSTEM)
        warm = second.chat("Summarise the incident.", max_tokens=8)
        system = [{"role": "system", "content": SYSTEM}]
        shared = common_prefix(  # the system prompt and the markers around it (Gemma has no system turn)
            render(mgr.tokenizer, system + [{"role": "user", "content": "What should we do first?"}]),
            render(mgr.tokenizer, system + [{"role": "user", "content": "Summarise the incident."}]),
        )
        assert shared >= 3 * CHUNK
        assert warm.stats.restored_tokens >= shared // CHUNK * CHUNK
    with kvstore.open(tmp_path / "cold", chunk_size=CHUNK) as store, AgentManager(str(path), store) as mgr:
        cold = mgr.create("second", system_prompt=SYSTEM).chat("Summarise the incident.", max_tokens=8)
        assert cold.stats.restored_tokens == 0
    assert warm.tokens == cold.tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_resumed_agent_prefills_only_its_new_message(models, tmp_path, arch):
    path, _loaded, _fp = models(arch)
    turns = ("What should we do first?", "And then?")
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        with AgentManager(str(path), store) as mgr:
            mgr.create("a", system_prompt=SYSTEM).chat(turns[0], max_tokens=6)
        with AgentManager(str(path), store) as mgr:  # a new manager: nothing resident
            agent = mgr.get("a")
            prompt = render(mgr.tokenizer, agent.conversation(agent.messages + [{"role": "user", "content": turns[1]}]))
            kept = common_prefix(agent.tokens, prompt)  # the history, less a reply that re-tokenizes otherwise
            history = len(agent.tokens)
            resumed = agent.chat(turns[1], max_tokens=8)
    with kvstore.open(tmp_path / "one", chunk_size=CHUNK) as store, AgentManager(str(path), store) as mgr:
        agent = mgr.create("a", system_prompt=SYSTEM)
        agent.chat(turns[0], max_tokens=6)
        uninterrupted = agent.chat(turns[1], max_tokens=8)
    # Its own snapshot: trimmed to `kept` where the cache can be trimmed, or whole where the turn continues
    # the agent's exact ids (a recurrent state: the new prompt is its history plus the new message).
    assert history >= resumed.stats.restored_tokens >= kept // CHUNK * CHUNK
    stats = resumed.stats
    assert stats.prefilled_tokens == stats.prompt_tokens - stats.restored_tokens <= 64
    assert resumed.stats.prefilled_tokens == uninterrupted.stats.prefilled_tokens
    assert resumed.tokens == uninterrupted.tokens


def test_a_llama4_prompt_that_diverges_in_an_earlier_attention_chunk_is_not_trimmed_into(models, tmp_path):
    """A ChunkedKVCache holds only about the last attention chunk's positions: cut back into an
    earlier chunk (mlx-lm's trim), it would lack that chunk's start. The agent restores instead."""
    from kvstore.agents import GenerationOptions

    path, (model, tokenizer), fp = models("llama4")
    options = GenerationOptions(max_tokens=6)
    caches = []
    for where in ("s", "cold"):
        with kvstore.open(tmp_path / where, chunk_size=CHUNK) as store, AgentManager(str(path), store) as mgr:
            agent = mgr.create("a", system_prompt=SYSTEM)
            if where == "s":
                agent.chat("What should we do first?", max_tokens=6)
                n = len(agent.tokens)
                # Generation left each chunked layer holding about its last 64 positions. Cut back to
                # the end of an attention chunk inside them: that chunk began 63 positions earlier.
                keep = n - 3 - (n - 3 - 63) % 64
                assert n - 65 <= keep <= n - 3
                prompt = agent.tokens[:keep] + tokenizer.encode("Then we wrote a test.", add_special_tokens=False)
            reply = agent.respond(prompt, agent.messages, options)
            if where == "s":
                assert reply.stats.restored_tokens + reply.stats.reused_tokens <= keep
            cache, tokens = store.load("a", model=fp)
            caches.append((tokens, model(mx.array([[7]]), cache=cache)[0, -1]))
    (edited_tokens, edited), (cold_tokens, cold) = caches
    assert edited_tokens == cold_tokens
    assert mx.allclose(edited, cold, atol=1e-4).item()


def test_kvstore_chat_takes_a_builtin_family_name_and_resumes_it(tmp_path):
    """`--model builtin:ARCH-SIZE` on the command line; the next process finds the model from the record."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KVSTORE_HOME": str(tmp_path / "s"), "KVSTORE_MODELS": str(tmp_path / "models")}
    kvstore_cmd = [sys.executable, "-c", "from kvstore.cli.main import main; main()"]
    first = ["chat", "a", "What should we do first?", "--model", "builtin:llama4-tiny", "--max-tokens", "4"]
    for args in (first, ["chat", "a", "And then?", "--max-tokens", "4"]):
        out = subprocess.run(kvstore_cmd + args, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "models" / "llama4-tiny-s0-float32" / "config.json").is_file()
    with kvstore.open(tmp_path / "s") as store:
        assert store.agent("a").meta["meta"]["model"] == "builtin:llama4-tiny"
        assert store.snapshots("a")[-1].n_tokens > 0
