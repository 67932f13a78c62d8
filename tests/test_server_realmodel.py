"""`kvstore serve` end to end on the real model (SmolLM2-135M-Instruct), where it is installed."""

from __future__ import annotations

import pytest
from server_process import ServerProcess, new_store

REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real_model() -> str:
    """The model's name where `resolve_model` knows it, else its fetched folder; skipped where neither is."""
    from pathlib import Path

    from kvstore.agents import ModelLoadError, resolve_model

    folder = Path.home() / ".cache" / "kvstore" / "models" / REAL_MODEL
    if not (folder / "config.json").is_file():  # (no network round trip to find out)
        pytest.skip(f"{REAL_MODEL} is not fetched here: `python -m kvstore.models fetch {REAL_MODEL}`")
    try:
        resolve_model(REAL_MODEL)
        return REAL_MODEL
    except ModelLoadError:
        return str(folder)  # fetched, but this resolve_model does not know the name yet


def test_real_model_answers_and_resumes_from_disk_after_a_restart(tmp_path, real_model):
    srv = ServerProcess(real_model, new_store(tmp_path / "store")).start()
    client = srv.openai()
    messages = [
        {"role": "system", "content": "You are a concise geography assistant. " * 20},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first = client.chat.completions.create(model=real_model, messages=messages, max_tokens=24)
    answer = first.choices[0].message.content
    assert "Paris" in answer  # a real model, really answering
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    before = client.chat.completions.create(model=real_model, messages=messages, max_tokens=24)
    assert before.usage.model_extra["kvstore"]["cached_ram_tokens"] > 0
    srv.stop()
    srv.start()
    try:
        after = srv.openai().chat.completions.create(model=real_model, messages=messages, max_tokens=24)
        ext = after.usage.model_extra["kvstore"]
        assert ext["cached_disk_tokens"] > 0 and ext["cached_ram_tokens"] == 0
        assert after.choices[0].message.content == before.choices[0].message.content
    finally:
        assert srv.stop() == 0
