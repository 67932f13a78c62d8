"""`kvstore serve` on a hybrid model (qwen3_next: gated delta-net + attention), killed with SIGKILL after two
turns: the third turn resumes from the store's turn-end checkpoint, prefills only its new message and answers
as a server never killed does; a second conversation sharing the system prompt restores it."""

from __future__ import annotations

import pytest
from conftest import TEST_CHUNK
from hybrid_models import tokenizer, write_model
from server_process import ServerProcess, new_store
from test_server_restarts import crash_and_resume

from kvstore.agents import turn
from kvstore.models.builtin import CORPUS

pytest.importorskip("openai")

SYSTEM = CORPUS[:1200]  # ~280 tokens: many 16-token chunks


@pytest.fixture(scope="module")
def hybrid_path(tmp_path_factory) -> str:
    return str(write_model("qwen3_next", tmp_path_factory.mktemp("models") / "qwen3_next-tiny"))


@pytest.mark.slow
def test_a_hybrid_model_resumes_after_sigkill_prefilling_only_the_new_message(tmp_path, hybrid_path):
    usage = crash_and_resume(tmp_path, hybrid_path, {}, system=SYSTEM)
    ext = usage.model_extra["kvstore"]
    assert ext["cached_disk_tokens"] == usage.prompt_tokens - ext["prefilled_tokens"]
    assert ext["prefilled_tokens"] <= 64


@pytest.mark.slow
def test_a_second_conversation_restores_the_shared_system_prompt(tmp_path, hybrid_path):
    prompts = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        for q in ("Summarise the report.", "What should we do first?")
    ]
    rendered = [turn.render(tokenizer(), m) for m in prompts]
    whole = turn.common_prefix(*rendered) // TEST_CHUNK * TEST_CHUNK
    srv = ServerProcess(hybrid_path, new_store(tmp_path / "s")).start()
    try:
        client = srv.openai()
        for msgs in prompts:
            r = client.chat.completions.create(model=hybrid_path, messages=msgs, max_tokens=4)
        ext = r.usage.model_extra["kvstore"]
        assert r.usage.prompt_tokens == len(rendered[1]) and whole >= 3 * TEST_CHUNK
        assert ext["cached_disk_tokens"] >= 0.9 * whole
        assert ext["prefilled_tokens"] == r.usage.prompt_tokens - ext["cached_disk_tokens"]
    finally:
        assert srv.stop() == 0
