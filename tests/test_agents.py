"""Agent manager on real built-in mlx-lm models: turns, warm start, residency, fork, recovery, resume."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from conftest import TEST_CHUNK

import kvstore
from kvstore.agents import AgentManager, RecoveryWarning, consult, resolve_model
from kvstore.agents import turn as turn_mod
from kvstore.agents.team import coordinator_message
from kvstore.errors import AgentExistsError, ModelMismatchError, UnknownAgentError

ARCHS = ("llama", "gemma3")
WORDS = (
    "ledger capture refund webhook merchant acquirer idempotency canary rollback severity "
    "replica schema migration retry timeout gateway"
).split()


def text_of(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """Deterministic prose of at least n_tokens tokens."""
    rng = np.random.default_rng(salt)
    out: list[str] = []
    while len(tokenizer.encode(" ".join(out))) < n_tokens:
        out.extend(rng.choice(WORDS, size=8).tolist() + ["."])
    return " ".join(out)


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory):
    from kvstore.models.builtin import builtin_model_path

    root = tmp_path_factory.mktemp("builtin-models")
    return {arch: builtin_model_path(arch=arch, size="tiny", root=root) for arch in ARCHS}


@pytest.fixture(scope="session")
def handles(model_paths):
    return {arch: resolve_model(path) for arch, path in model_paths.items()}


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def fresh_store(tmp_path, name="store"):
    return kvstore.open(tmp_path / name, chunk_size=TEST_CHUNK)


def preamble(handle, salt=0) -> str:
    """A shared system prompt long enough to span many chunks and (gemma3) the sliding window."""
    window = turn_mod.min_window(handle.make_cache()) or 0
    return text_of(handle.tokenizer, max(160, 2 * window + 40), salt)


def expected_source(handle, seen: list[int], now: list[int]) -> str:
    """Where a resident agent's next turn starts: a rotated sliding window cannot be cut back, so if
    the template re-renders the last answer differently, the common prefix comes from the store."""
    rerendered = turn_mod.common_prefix(seen, now) < len(seen)
    window = turn_mod.min_window(handle.make_cache())
    return "store" if rerendered and window is not None and len(seen) >= window else "resident"


def assert_exact_history(mgr, agent) -> None:
    """The resident cache has seen exactly the agent's token history."""
    res = mgr._resident[agent.name]
    assert kvstore.cache_tokens(res.cache) == len(agent.tokens)


# -- a turn ----------------------------------------------------------------------------------


def test_turn_stats_and_incremental_autosave(tmp_path, handles, arch):
    h = handles[arch]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        a = mgr.create("a", preamble(h))
        r1 = a.chat("What failed?", max_tokens=12)
        s = r1.stats
        assert (s.source, s.reused_tokens, s.restored_tokens) == ("cold", 0, 0)
        assert s.prefilled_tokens == s.prompt_tokens == len(turn_mod.render(h.tokenizer, a.conversation()[:2]))
        assert s.generated_tokens == len(r1.tokens) >= 1
        assert a.tokens[: s.prompt_tokens] == turn_mod.render(h.tokenizer, a.conversation()[:2])
        assert_exact_history(mgr, a)
        assert store.tokens("a") == a.tokens  # autosaved
        blobs_after_1 = store.stats().blobs

        seen = list(a.tokens)
        r2 = a.chat("And then?", max_tokens=12)
        s2 = r2.stats
        assert s2.source == expected_source(h, seen, a.tokens)
        assert s2.reused_tokens + s2.restored_tokens > s.prompt_tokens - TEST_CHUNK
        assert s2.prompt_tokens == s2.reused_tokens + s2.restored_tokens + s2.prefilled_tokens
        assert_exact_history(mgr, a)
        # incremental: the second save writes only the chunks the turn changed
        assert 0 < s2.bytes_saved < s.bytes_saved
        assert store.stats().blobs - blobs_after_1 < blobs_after_1
        assert [m["role"] for m in a.messages] == ["user", "assistant", "user", "assistant"]
        assert a.messages[-1]["content"] == r2.text
        assert store.agent("a").meta["messages"] == a.messages
        assert store.fsck().ok


def test_stream_matches_reply_and_interrupt_keeps_history_exact(tmp_path, handles):
    h = handles["llama"]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        ref = mgr.create("ref", "You are terse.")
        a = mgr.create("a", "You are terse.")
        want = ref.chat("Say something long.", max_tokens=20)
        stream = a.chat("Say something long.", max_tokens=20, stream=True)
        got = "".join(stream)
        assert got == want.text and stream.reply.tokens == want.tokens

        b = mgr.create("b", "You are terse.")
        stream = b.chat("Say something long.", max_tokens=20, stream=True)
        it = iter(stream)
        next(it)
        stream.close()
        assert stream.reply.finish_reason == "interrupted"
        assert len(stream.reply.tokens) < 20
        assert_exact_history(mgr, b)
        assert store.tokens("b") == b.tokens
        b.chat("Go on.", max_tokens=4)
        assert_exact_history(mgr, b)


def test_template_rerender_trims_to_common_prefix(tmp_path, handles, arch):
    """When the template renders the last answer differently, the cache is cut back, never reused past it."""
    h = handles[arch]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        a = mgr.create("a", "Short role.")
        a.chat("hello", max_tokens=10)
        seen = list(a.tokens)
        a.messages[-1]["content"] = "an answer the model never produced"  # forces a divergence
        r = a.chat("next", max_tokens=5)
        prompt = a.tokens[: r.stats.prompt_tokens]
        shared = turn_mod.common_prefix(seen, prompt)
        assert r.stats.reused_tokens + r.stats.restored_tokens <= shared
        assert_exact_history(mgr, a)

        # the same conversation from scratch gives the same tokens
        with fresh_store(tmp_path, "other") as other:
            b = AgentManager(h, other).create("a", "Short role.")
            b.messages = [dict(m) for m in a.messages[:2]]
            assert b.chat("next", max_tokens=5).tokens == r.tokens


# -- warm start ------------------------------------------------------------------------------


def test_warm_start_restores_shared_preamble_and_matches_cold(tmp_path, handles, arch):
    h = handles[arch]
    pre = preamble(h)
    window = turn_mod.min_window(h.make_cache())
    with fresh_store(tmp_path, "cold") as cold_store:
        cold = AgentManager(h, cold_store).create("b", pre + " Role B.").chat("Status?", max_tokens=16)
    assert cold.stats.restored_tokens == 0 and len(cold.tokens) > 4  # a real reply: the comparison bites
    with fresh_store(tmp_path, "warm") as store:
        mgr = AgentManager(h, store)
        mgr.create("a", pre + " Role A.").chat("Hi", max_tokens=4)
        b = mgr.create("b", pre + " Role B.")
        warm = b.chat("Status?", max_tokens=16)
        warm_prompt = b.tokens[: warm.stats.prompt_tokens]
        shared = turn_mod.common_prefix(store.tokens("a"), warm_prompt)
        assert warm.stats.source == "store"
        assert warm.stats.restored_tokens == shared // TEST_CHUNK * TEST_CHUNK > 0
        if window is not None:  # sliding-window layers: only chunk capture during prefill makes this possible
            assert warm.stats.restored_tokens > window
        assert warm.stats.prefilled_tokens == len(warm_prompt) - warm.stats.restored_tokens
        assert warm.tokens == cold.tokens
        assert store.fsck().ok


def test_sliding_window_chunks_of_a_long_answer_stay_restorable(tmp_path, handles):
    """Chunks an answer completes are captured before they leave the window: any boundary can be restored."""
    h = handles["gemma3"]
    window = turn_mod.min_window(h.make_cache())
    with fresh_store(tmp_path) as store:
        a = AgentManager(h, store).create("a", "Short role.")
        r = a.chat("Talk for a long time.", max_tokens=window + 4 * TEST_CHUNK)
        assert len(r.tokens) == window + 4 * TEST_CHUNK
        start = -(-r.stats.prompt_tokens // TEST_CHUNK) * TEST_CHUNK  # first boundary inside the answer
        boundaries = range(start + TEST_CHUNK, len(a.tokens) - window, TEST_CHUNK)
        assert len(boundaries) >= 2
        for b in boundaries:
            assert store.match(a.tokens[:b], model=h.fingerprint).n_tokens == b
        cache, n = store.restore(a.tokens[: boundaries[0]], model=h.fingerprint)
        assert n == boundaries[0] == kvstore.cache_tokens(cache)


# -- residency -------------------------------------------------------------------------------


def test_lru_eviction_saves_and_reloads(tmp_path, handles, arch):
    h = handles[arch]
    pre = preamble(h)
    with fresh_store(tmp_path, "ref") as ref_store:
        ref = AgentManager(h, ref_store, max_resident=3)
        want = {n: ref.create(n, pre + f" Agent {n}.").chat("One?", max_tokens=6) for n in "abc"}
        want_again = ref.get("a").chat("Two?", max_tokens=6)
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store, max_resident=2)
        agents = {n: mgr.create(n, pre + f" Agent {n}.") for n in "abc"}
        for n, a in agents.items():
            assert a.chat("One?", max_tokens=6).tokens == want[n].tokens
        assert mgr.resident() == ["b", "c"]
        assert not agents["a"].resident
        assert store.tokens("a") == agents["a"].tokens  # saved before it was evicted
        again = agents["a"].chat("Two?", max_tokens=6)
        assert again.stats.source == "store"
        assert again.stats.restored_tokens > 0
        assert again.tokens == want_again.tokens
        assert mgr.resident() == ["c", "a"]

    with fresh_store(tmp_path, "bytes") as store:
        mgr = AgentManager(h, store, max_resident=5, max_resident_bytes=1)
        for n in "ab":
            mgr.create(n, pre).chat("One?", max_tokens=3)
        assert mgr.resident() == ["b"]  # the agent in use stays even over the byte budget
        report = mgr.memory_report()
        assert list(report.caches) == ["b"] and report.caches["b"] > 0


def test_load_get_list_delete_and_errors(tmp_path, handles):
    h = handles["llama"]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store, max_resident=1)
        a = mgr.create("a", "Role.", meta={"team": "x"})
        with pytest.raises(AgentExistsError):
            mgr.create("a", "Again.")
        a.chat("hi", max_tokens=3)
        mgr.create("b", "Role.").chat("hi", max_tokens=3)
        assert mgr.resident() == ["b"]
        assert mgr.load("a") is a and mgr.resident() == ["a"]
        assert_exact_history(mgr, a)
        assert [i.name for i in mgr.list()] == ["a", "b"]
        fresh = AgentManager(h, store)
        b2 = fresh.get("b")
        assert (b2.system_prompt, b2.tokens, b2.messages) == ("Role.", mgr.get("b").tokens, mgr.get("b").messages)
        assert fresh.get("a").meta == {"team": "x"}
        assert mgr.delete("b") and not mgr.delete("b")
        with pytest.raises(UnknownAgentError):
            mgr.get("b")
        other = AgentManager(handles["gemma3"], store)
        with pytest.raises(ModelMismatchError):
            other.get("a")
        assert other.list() == []


# -- fork ------------------------------------------------------------------------------------


def test_fork_shares_blobs_and_is_independent(tmp_path, handles, arch):
    h = handles[arch]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        a = mgr.create("a", preamble(h))
        a.chat("First?", max_tokens=8)
        res = mgr._resident["a"]
        before_arrays = [np.array(x) for x in _arrays(res.cache)]
        before_tokens, before_messages = list(a.tokens), [dict(m) for m in a.messages]
        bytes_before = store.stats().bytes_on_disk

        b = mgr.fork("a", "b")
        assert store.stats().bytes_on_disk == bytes_before  # every blob shared, none copied
        assert b.tokens == a.tokens and b.messages == a.messages and b.resident
        rb = b.chat("Fork question?", max_tokens=8)
        assert rb.stats.source == expected_source(h, before_tokens, b.tokens)
        assert rb.stats.reused_tokens + rb.stats.restored_tokens > 0

        assert a.tokens == before_tokens and a.messages == before_messages
        after = [np.array(x) for x in _arrays(mgr._resident["a"].cache)]
        assert len(after) == len(before_arrays)
        assert all(np.array_equal(x, y) for x, y in zip(before_arrays, after))
        assert store.tokens("a") == before_tokens

        # the original continues exactly as if there had been no fork
        with fresh_store(tmp_path, "ref") as ref_store:
            r = AgentManager(h, ref_store).create("a", preamble(h))
            r.chat("First?", max_tokens=8)
            want = r.chat("Original question?", max_tokens=8)
        assert a.chat("Original question?", max_tokens=8).tokens == want.tokens
        assert store.fsck().ok


def _arrays(cache):
    from kvstore.cache import codec
    from kvstore.cache.leaves import arrays_of

    _tree, _slots, leaves = codec.describe(list(cache))
    return arrays_of(leaves)


# -- recovery --------------------------------------------------------------------------------


def _blob_of_first_chunk(store, name: str) -> str:
    from sqlalchemy import select

    from kvstore.index import db, schema

    sc, cl, a = schema.snapshot_chunks, schema.chunk_layers, schema.agents
    with db.transaction(store.engine, write=False, what="test") as conn:
        key = conn.execute(
            select(sc.c.chunk_key)
            .select_from(sc.join(a, a.c.head == sc.c.snapshot_id))
            .where(a.c.name == name, sc.c.seq == 0)
        ).scalar_one()
        return conn.execute(select(cl.c.blob_id).where(cl.c.chunk_key == key).limit(1)).scalar_one()


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_recovery_from_damaged_blob_gives_same_answer(tmp_path, handles, arch, damage):
    h = handles[arch]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        a = mgr.create("a", preamble(h))
        a.chat("First?", max_tokens=8)
    shutil.copytree(tmp_path / "store", tmp_path / "pristine")
    with kvstore.open(tmp_path / "pristine") as pristine:
        want = AgentManager(h, pristine).get("a").chat("Second?", max_tokens=12)
        assert want.stats.restored_tokens > 0 and not want.stats.recovered

    with kvstore.open(tmp_path / "store") as store:
        path = store.blobs.path(_blob_of_first_chunk(store, "a"))
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        assert not store.fsck().ok
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = AgentManager(h, store).get("a").chat("Second?", max_tokens=12)
        recovery = [w for w in caught if issubclass(w.category, RecoveryWarning)]
        assert len(recovery) == 1
        assert got.stats.recovered
        assert got.tokens == want.tokens
        report = store.fsck()
        assert report.ok, report.problems
        with warnings.catch_warnings():
            warnings.simplefilter("error", RecoveryWarning)
            again = AgentManager(h, store).load("a")
        assert again.tokens == store.tokens("a")


@pytest.mark.parametrize("found_by", ["load", "fsck --repair"])
def test_load_recomputes_a_damaged_agent_from_its_tokens(tmp_path, handles, arch, found_by):
    h = handles[arch]
    with fresh_store(tmp_path) as store:
        a = AgentManager(h, store).create("a", preamble(h))
        a.chat("First?", max_tokens=8)
        history = store.tokens("a")
        want, _ = store.load("a", model=h.fingerprint)
        store.blobs.path(_blob_of_first_chunk(store, "a")).unlink()
        if found_by == "fsck --repair":  # the blob's rows are gone: the load finds a shorter whole prefix
            assert "prefix_shortened" in {p.kind for p in store.fsck(repair=True).problems}
        mgr = AgentManager(h, store)
        with pytest.warns(RecoveryWarning):
            got = mgr.load("a")
        assert got.tokens == history and got.resident
        assert_exact_history(mgr, got)
        assert store.fsck().ok  # the recomputed chunks were saved again
        reloaded, tokens = store.load("a", model=h.fingerprint)
        assert tokens == history
        for x, y in zip(_arrays(want), _arrays(reloaded)):
            assert np.allclose(np.array(x), np.array(y), atol=1e-4)


# -- the multi-agent helper and the memory report --------------------------------------------


def test_consult_and_memory_report(tmp_path, handles):
    h = handles["llama"]
    with fresh_store(tmp_path) as store:
        mgr = AgentManager(h, store)
        pre = preamble(h)
        team = [mgr.create(n, pre + f" You are {n}.") for n in ("tech", "biz")]
        coord = mgr.create("coord", pre + " You coordinate.")
        seen = []
        result = consult(team, coord, "What broke?", max_tokens=6, on_reply=seen.append)
        assert list(result.replies) == ["tech", "biz"]
        assert [r.agent for r in seen] == ["tech", "biz", "coord"]
        assert result.all() == seen
        assert coord.messages[0]["content"] == coordinator_message("What broke?", result.replies)
        assert all(r.text.strip() in coord.messages[0]["content"] for r in result.replies.values())
        assert result.replies["biz"].stats.restored_tokens > 0  # the shared preamble came from the store

        rep = mgr.memory_report()
        from mlx.utils import tree_flatten

        assert rep.model_bytes == sum(v.nbytes for _, v in tree_flatten(h.model.parameters()))
        assert list(rep.caches) == ["tech", "biz", "coord"]
        assert rep.caches["coord"] == kvstore.cache_nbytes(mgr._resident["coord"].cache) > 0
        assert rep.cache_tokens["tech"] == len(team[0].tokens)
        assert rep.rss_bytes > rep.model_bytes and rep.peak_rss_bytes >= rep.rss_bytes


def test_model_from_path_and_loaded_pair(tmp_path, model_paths):
    from mlx_lm import load

    from kvstore.agents import ModelLoadError

    path = model_paths["llama"]
    with fresh_store(tmp_path) as store:
        by_path = AgentManager(str(path), store)
        assert by_path.fingerprint == kvstore.fingerprint(path)
        pair = load(str(path))
        by_pair = AgentManager(pair, store)
        assert by_pair.fingerprint == kvstore.fingerprint(pair[0])
        a = by_path.create("a", "Role.").chat("hi", max_tokens=5)
        b = by_pair.create("b", "Role.").chat("hi", max_tokens=5)
        assert a.tokens == b.tokens
    with pytest.raises(ModelLoadError):
        resolve_model(str(tmp_path / "no-such-model"))


def test_an_agent_imported_without_trust_continues_in_a_manager(tmp_path, handles):
    """Kept-apart imports live under their archive's namespace; the manager still knows them as its model's."""
    h = handles["llama"]
    with kvstore.open(tmp_path / "a") as store:
        mgr = AgentManager(h, store)
        mgr.create("baker", "You bake bread.").chat("Which flour?", max_tokens=8)
        kvstore.export_agent(store, "baker", tmp_path / "baker.kvagent")
        expected = mgr.get("baker").chat("And the oven?", max_tokens=8).text
    with kvstore.open(tmp_path / "b") as fresh:
        kvstore.import_agent(fresh, tmp_path / "baker.kvagent")
        reply = AgentManager(h, fresh).get("baker").chat("And the oven?", max_tokens=8)
        assert reply.text == expected
        assert fresh.fsck().ok
