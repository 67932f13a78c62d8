"""`kvstore serve` killed with SIGKILL mid-conversation and started again: the next turn resumes from the
store and answers as a server that was never killed does (a Llama-style model, a sliding-window one, and
a team store on PostgreSQL and S3 reached from a second machine's empty disk tier)."""

from __future__ import annotations

import signal

import pytest
from conftest import PG_URL, S3_URL, TEST_CHUNK
from server_process import SYSTEM, ServerProcess, ask, conversation, new_store, tiny_model

import kvstore

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory, "gemma3")


def reference_replies(tmp_path, model: str, turns: int, **kw) -> list[tuple[str, object]]:
    """conversation() on a server of its own that nothing interrupts."""
    ref = ServerProcess(model, new_store(tmp_path / "ref")).start()
    try:
        return conversation(ref.openai(), model, turns, **kw)
    finally:
        ref.stop()


def two_turns_then_kill(srv: ServerProcess, model: str, system: str = SYSTEM, **kw) -> list[dict]:
    """The conversation's first two turns on srv, then SIGKILL; returns the messages so far."""
    msgs = [{"role": "system", "content": system}]
    for i in range(2):
        ask(srv.openai(), model, msgs, i, **kw)
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
    return msgs


def crash_and_resume(tmp_path, model: str, sampling: dict, system: str = SYSTEM):
    """Two turns, SIGKILL, restart: the third turn resumes from disk and answers as a server that was never
    killed does. Returns its usage."""
    expected = reference_replies(tmp_path, model, 3, system=system, **sampling)
    srv = ServerProcess(model, new_store(tmp_path / "crash")).start()
    msgs = two_turns_then_kill(srv, model, system, **sampling)
    srv.start()
    try:
        r = ask(srv.openai(), model, msgs, 2, **sampling)
        ext = r.usage.model_extra["kvstore"]
        assert r.usage.prompt_tokens_details.cached_tokens > 0 and ext["cached_disk_tokens"] > 0
        assert ext["cached_ram_tokens"] == 0
        assert r.choices[0].message.content == expected[2][0]
        assert r.usage.completion_tokens == expected[2][1].completion_tokens
        assert r.usage.prompt_tokens == expected[2][1].prompt_tokens
        assert ext["prefilled_tokens"] == expected[2][1].model_extra["kvstore"]["prefilled_tokens"]
    finally:
        assert srv.stop() == 0
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
    return r.usage


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_sigkill_then_restart_gives_the_uninterrupted_reply(tmp_path, model_path, sampling):
    crash_and_resume(tmp_path, model_path, sampling)


def test_a_sliding_window_model_resumes_after_sigkill_with_the_uninterrupted_reply(tmp_path, gemma_path):
    # gemma3 tiny: three of its four layers keep a 64-token window, which the conversation has passed
    # long before the kill; the restore rebuilds those windows from stored chunks.
    system = "You are a careful assistant who checks every step twice before answering. " * 4
    usage = crash_and_resume(tmp_path, gemma_path, {}, system=system)
    assert usage.prompt_tokens > 2 * 64


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.skipif(not (PG_URL and S3_URL), reason="needs PostgreSQL and S3 (.ci/run starts both)")
def test_a_team_store_on_postgresql_and_s3_resumes_a_killed_server_on_an_empty_disk_tier(tmp_path, model_path):
    from conftest import s3_store_args

    expected = reference_replies(tmp_path, model_path, 3)
    index, kw = s3_store_args(tmp_path)  # the index in a fresh PostgreSQL database, the blobs under an S3 prefix
    kvstore.open(index, blobs=kw["blobs"], cache_dir=tmp_path / "tier-a", chunk_size=TEST_CHUNK).close()

    def server(tier: str) -> ServerProcess:  # as on one machine of the team: its own disk tier
        env = {"KVSTORE_CACHE_DIR": str(tmp_path / tier)}
        return ServerProcess(model_path, index, "--blobs", kw["blobs"], log=tmp_path / f"{tier}.log", env=env)

    msgs = two_turns_then_kill(server("tier-a").start(), model_path)
    other = server("tier-b").start()  # another machine: nothing on its disk, everything in the bucket
    try:
        r = ask(other.openai(), model_path, msgs, 2)
        assert r.usage.model_extra["kvstore"]["cached_disk_tokens"] > 0
        assert r.choices[0].message.content == expected[2][0]
    finally:
        assert other.stop() == 0
    assert any((tmp_path / "tier-b").rglob("*.safetensors"))  # fetched from the bucket into the empty tier
    with kvstore.open(index, blobs=kw["blobs"], cache_dir=tmp_path / "tier-c") as store:
        assert store.fsck().ok
