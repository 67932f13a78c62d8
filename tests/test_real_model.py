"""On a real instruct model (SmolLM2-135M-Instruct), stored caches give exactly the answers of live ones.

Greedy decoding, so "the same answer" means the same token ids. Each test runs a few short turns: the
whole file takes about a minute on a 2-core CPU with OpenBLAS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_CHUNK

from kvstore.agents import AgentManager, turn

pytestmark = pytest.mark.real_model

import kvstore  # noqa: E402

SYSTEM = (
    "You are a concise assistant for a small bakery in Lyon. The bakery opens at 7:00, closes at 19:00, "
    "sells croissants for 1.20 EUR and baguettes for 1.10 EUR, and is closed on Mondays."
)
QUESTIONS = ["When does the bakery open?", "How much do two croissants cost?", "Is it open on Monday?"]
MAX_TOKENS = 12

# One chat turn in a new Python process: open the store, create or load the agent, answer, save, report.
TURN_SCRIPT = """
import json, sys
import kvstore
kvstore.use_openblas()
from kvstore.agents import AgentManager
store_path, model_dir, name, system, question, max_tokens = sys.argv[1:7]
with kvstore.open(store_path, chunk_size=int(sys.argv[7])) as store:
    mgr = AgentManager(model_dir, store, max_resident=1)
    agent = mgr.get(name) if any(a.name == name for a in store.agents()) else mgr.create(name, system_prompt=system)
    reply = agent.chat(question, max_tokens=int(max_tokens))
    mgr.close()
print(json.dumps({"tokens": list(reply.tokens), "text": reply.text, "stats": reply.stats.as_dict()}))
"""


def chat_in_new_process(store_path, model_dir, name, question, system=SYSTEM) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            TURN_SCRIPT,
            str(store_path),
            str(model_dir),
            name,
            system,
            question,
            str(MAX_TOKENS),
            str(TEST_CHUNK),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_it_is_a_real_model(tmp_path, real_model):
    """The converted model answers a factual question right (the converter's rope permutation, tokenizer...)."""
    with kvstore.open(tmp_path / "s", chunk_size=TEST_CHUNK) as store:
        mgr = AgentManager(real_model, store)
        reply = mgr.create("geo").chat("What is the capital of France?", max_tokens=16)
        assert "Paris" in reply.text
        assert store.fsck().ok


def test_resume_in_new_processes_gives_the_uninterrupted_answers(tmp_path, real_model, real_model_dir):
    """Three turns, each in a new process restoring from the store, equal three turns in one live session."""
    with kvstore.open(tmp_path / "live", chunk_size=TEST_CHUNK) as store:
        mgr = AgentManager(real_model, store, max_resident=1)
        agent = mgr.create("baker", system_prompt=SYSTEM)
        live = [agent.chat(q, max_tokens=MAX_TOKENS) for q in QUESTIONS]
        assert [r.stats.source for r in live] == ["cold", "resident", "resident"]
        mgr.close()
    resumed = [chat_in_new_process(tmp_path / "resumed", real_model_dir, "baker", q) for q in QUESTIONS]
    assert [r["tokens"] for r in resumed] == [list(r.tokens) for r in live]
    assert resumed[0]["stats"]["restored_tokens"] == 0
    for later, live_reply in zip(resumed[1:], live[1:]):
        # A new process has nothing in memory: the conversation so far came from the store.
        assert later["stats"]["source"] == "store"
        assert later["stats"]["restored_tokens"] >= live_reply.stats.reused_tokens - TEST_CHUNK
        assert later["stats"]["restored_tokens"] > 0
    with kvstore.open(tmp_path / "resumed", create=False) as store:
        assert store.fsck().ok


def test_warm_start_from_a_shared_system_prompt_answers_as_a_cold_one(tmp_path, real_model):
    """A second agent with the same system prompt starts from the first one's chunks and answers identically."""
    question = "What time does the bakery close?"
    with kvstore.open(tmp_path / "shared", chunk_size=TEST_CHUNK) as store:
        first = AgentManager(real_model, store)
        first.create("a", system_prompt=SYSTEM).chat(QUESTIONS[0], max_tokens=MAX_TOKENS)
        first.close()
        warm = AgentManager(real_model, store).create("b", system_prompt=SYSTEM).chat(question, max_tokens=MAX_TOKENS)
    with kvstore.open(tmp_path / "empty", chunk_size=TEST_CHUNK) as store:
        cold = AgentManager(real_model, store).create("b", system_prompt=SYSTEM).chat(question, max_tokens=MAX_TOKENS)
    assert cold.stats.source == "cold" and cold.stats.restored_tokens == 0
    assert warm.stats.source == "store"
    system_tokens = len(turn.render(real_model.tokenizer, [{"role": "system", "content": SYSTEM}]))
    assert warm.stats.restored_tokens >= system_tokens - TEST_CHUNK  # every whole chunk of the shared prompt
    assert warm.tokens == cold.tokens
    assert warm.text == cold.text


def test_answer_after_export_and_import_into_a_fresh_store_is_the_same(tmp_path, real_model):
    """`kvstore export` then `kvstore import` elsewhere: the agent's next answer is the one it gives at home."""
    home = tmp_path / "home"
    with kvstore.open(home, chunk_size=TEST_CHUNK) as store:
        mgr = AgentManager(real_model, store)
        mgr.create("baker", system_prompt=SYSTEM).chat(QUESTIONS[0], max_tokens=MAX_TOKENS)
        mgr.close()
    archive = tmp_path / "baker.kvs"
    for args in (
        ["--store", str(home), "export", "baker", str(archive)],
        ["--store", str(tmp_path / "elsewhere"), "import", str(archive)],
    ):
        done = subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    answers = {}
    for where in ("home", "elsewhere"):
        with kvstore.open(tmp_path / where, create=False) as store:
            reply = AgentManager(real_model, store).get("baker").chat(QUESTIONS[1], max_tokens=MAX_TOKENS)
            assert reply.stats.source == "store" and reply.stats.prefilled_tokens < reply.stats.prompt_tokens // 2
            answers[where] = reply.tokens
            assert store.fsck().ok
    assert answers["elsewhere"] == answers["home"]


def test_template_re_rendering_never_serves_unseen_tokens(tmp_path, real_model):
    """SmolLM2's template adds a default system prompt and re-renders earlier turns from their text.

    The tokens a cache holds (generated ids) may differ from the re-rendered prompt (re-tokenized text):
    a turn may only reuse or restore the common prefix of what the cache saw and what the prompt is,
    and its answer equals a cold prefill of the same prompt.
    """
    tok = real_model.tokenizer
    with kvstore.open(tmp_path / "s", chunk_size=TEST_CHUNK) as store:
        mgr = AgentManager(real_model, store, max_resident=1)
        agent = mgr.create("plain")  # no system prompt: the template inserts its default one
        for i, q in enumerate(QUESTIONS[:2] + ["Thanks! Anything else?"]):
            seen, earlier = list(agent.tokens), [dict(m) for m in agent.messages]
            prompt = turn.render(tok, earlier + [{"role": "user", "content": q}])
            if i == 2:  # the third turn comes from the store, not from memory
                mgr.close()
                mgr = AgentManager(real_model, store, max_resident=1)
                agent = mgr.get("plain")
            reply = agent.chat(q, max_tokens=MAX_TOKENS)
            assert "You are a helpful AI assistant named SmolLM" in tok.decode(prompt)
            assert reply.stats.prompt_tokens == len(prompt)
            served = reply.stats.reused_tokens + reply.stats.restored_tokens
            assert served <= turn.common_prefix(seen, prompt)
            if i > 0:
                assert served > 0
            assert agent.tokens[: len(prompt)] == prompt
            with kvstore.open(tmp_path / f"cold{i}", chunk_size=TEST_CHUNK) as empty:
                cold_agent = AgentManager(real_model, empty).create("plain")
                cold_agent.messages = earlier  # the same conversation, never computed: a cold prefill
                cold = cold_agent.chat(q, max_tokens=MAX_TOKENS)
            assert cold.stats.source == "cold" and cold.stats.prompt_tokens == len(prompt)
            assert reply.tokens == cold.tokens
        assert store.fsck().ok
