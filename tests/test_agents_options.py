"""Agent.chat's sampling and template options, and conversations that start from another's resident cache."""

from __future__ import annotations

import pytest
from conftest import TEST_CHUNK

import kvstore
from kvstore.agents import AgentManager, GenerationOptions, resolve_model
from kvstore.agents import turn as turn_mod


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    from kvstore.models.builtin import builtin_model_path

    return resolve_model(builtin_model_path(arch="llama", size="tiny", root=tmp_path_factory.mktemp("models")))


@pytest.fixture
def mgr(tmp_path, handle):
    with kvstore.open(tmp_path / "store", chunk_size=TEST_CHUNK) as store:
        with AgentManager(handle, store) as m:
            yield m
        assert store.fsck().ok


def test_stop_string_cuts_the_text_and_the_cache_keeps_every_token(mgr):
    free = mgr.create("free", "Role.").chat("Say things.", max_tokens=24)
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = mgr.create("cut", "Role.").chat("Say things.", max_tokens=24, stop=[stop, "never-seen-stop"])
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop"
    agent = mgr.get("cut")
    assert agent.messages[-1] == {"role": "assistant", "content": cut.text}
    assert agent.tokens == turn_mod.render(mgr.tokenizer, agent.conversation(agent.messages[:-1])) + list(cut.tokens)


def test_stop_string_split_across_segments_is_never_streamed(mgr):
    free = mgr.create("free", "Role.").chat("Say things.", max_tokens=24)
    stop = free.text[4:9]
    stream = mgr.create("s", "Role.").chat("Say things.", max_tokens=24, stop=stop, stream=True)
    streamed = "".join(stream)
    assert streamed == stream.reply.text == free.text[: free.text.index(stop)]


def test_seeded_sampling_repeats_and_differs_from_greedy(mgr):
    kw = dict(max_tokens=16, temp=1.5, top_p=0.95, top_k=50, seed=7)
    a = mgr.create("a", "Role.").chat("Hello", **kw)
    b = mgr.create("b", "Role.").chat("Hello", **kw)
    greedy = mgr.create("g", "Role.").chat("Hello", max_tokens=16)
    assert a.tokens == b.tokens
    assert a.tokens != greedy.tokens


def test_repetition_penalty_changes_a_repetitive_reply(mgr):
    plain = mgr.create("p", "Role.").chat("Hello", max_tokens=16)
    assert len(set(plain.tokens)) < len(plain.tokens)  # the random model repeats itself
    penalized = mgr.create("r", "Role.").chat("Hello", max_tokens=16, repetition_penalty=5.0)
    assert len(set(penalized.tokens)) > len(set(plain.tokens))


def test_tools_and_template_kwargs_reach_the_chat_template(handle, tmp_path):
    tok = handle.tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    original = tok.chat_template
    tok.chat_template = (
        "{% if tools %}TOOLS:{{ tools[0].function.name }}\n{% endif %}{% if shout %}LOUD\n{% endif %}" + original
    )
    try:
        plain = turn_mod.render(tok, messages)
        with_tools = turn_mod.render(tok, messages, tools)
        with_kwargs = turn_mod.render(tok, messages, None, {"shout": True})
        both = turn_mod.render(tok, [{"role": "system", "content": "Role."}] + messages, tools, {"shout": True})
        with kvstore.open(tmp_path / "s", chunk_size=TEST_CHUNK) as store:
            agent = AgentManager(handle, store).create("t", "Role.")
            reply = agent.chat("hi", max_tokens=2, tools=tools, chat_template_kwargs={"shout": True})
    finally:
        tok.chat_template = original
    assert tok.decode(with_tools[: len(with_tools) - len(plain)]).startswith("TOOLS:get_weather")
    assert tok.decode(with_kwargs[: len(with_kwargs) - len(plain)]).startswith("LOUD")
    assert reply.stats.prompt_tokens == len(both)
    assert agent.tokens[: len(both)] == both


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(temp=-1.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
        dict(seed=-1),  # MLX's seed is an unsigned 64-bit integer: these raised TypeError mid-turn (issue 25)
        dict(seed=2**64),
    ],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationOptions(**bad)


def test_a_new_conversation_copies_a_resident_prefix_and_answers_as_a_cold_one(handle, tmp_path):
    system = " ".join(["the shared system prompt says many things"] * 12)
    with kvstore.open(tmp_path / "cold", chunk_size=TEST_CHUNK) as store:
        cold = AgentManager(handle, store).create("b", system).chat("Question B", max_tokens=12)
    with kvstore.open(tmp_path / "warm", chunk_size=TEST_CHUNK) as store:
        mgr = AgentManager(handle, store, share_resident=True)
        a = mgr.create("a", system)
        a.chat("Question A", max_tokens=12)
        before = kvstore.cache_tokens(mgr._resident["a"].cache)
        warm = mgr.create("b", system).chat("Question B", max_tokens=12)
        assert warm.stats.source == "resident" and warm.stats.restored_tokens == 0
        shared = turn_mod.common_prefix(a.tokens, mgr.get("b").tokens)
        assert warm.stats.reused_tokens == shared > TEST_CHUNK
        assert warm.tokens == cold.tokens
        assert kvstore.cache_tokens(mgr._resident["a"].cache) == before  # the donor is untouched
        assert a.chat("Again", max_tokens=4).stats.source == "resident"
        mgr.share_resident = False  # the default: a new agent starts from the store, not from a copy
        c = mgr.create("c", system).chat("Question C", max_tokens=2)
        assert c.stats.source == "store" and c.stats.reused_tokens == 0 and c.stats.restored_tokens > 0
        assert store.fsck().ok
