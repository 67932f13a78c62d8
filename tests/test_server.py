"""`kvstore serve` as a real process on a loopback port, driven by the official openai and anthropic SDKs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai and anthropic SDKs are built on
import pytest
from conftest import TEST_CHUNK
from server_process import ServerProcess, chat, new_store, tiny_model

import kvstore

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path_factory.mktemp("shared") / "store")).start()
    yield srv
    assert srv.stop() == 0
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok


# -- OpenAI ------------------------------------------------------------------------------------


def test_models_and_health(server, model_path):
    client = server.openai()
    assert [m.id for m in client.models.list()] == [model_path]
    assert client.models.retrieve(model_path).id == model_path
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == model_path


def test_aliases_name_the_model_for_clients_that_ask_for_another(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "s"), "--alias", "gpt-4o-mini", "--alias", "claude-x").start()
    try:
        client = srv.openai()
        assert [m.id for m in client.models.list()] == [model_path, "gpt-4o-mini", "claude-x"]
        assert client.models.retrieve("claude-x").id == "claude-x"
        r = client.chat.completions.create(model="gpt-4o-mini", messages=chat("gpt-4o-mini", "Hi."), max_tokens=3)
        assert r.usage.completion_tokens == 3
        m = srv.anthropic().messages.create(
            model="claude-x", max_tokens=3, messages=[{"role": "user", "content": "Hi."}]
        )
        assert m.usage.output_tokens == 3
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=chat("gpt-4o", "Hi."), max_tokens=3)
        assert e.value.body["code"] == "model_not_found"
    finally:
        assert srv.stop() == 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.server",
            "--model",
            model_path,
            "--store",
            str(tmp_path / "t"),
            "--alias",
            " x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--alias ' x'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "t").exists()


def test_chat_next_turn_reports_cached_tokens(server, model_path):
    client = server.openai()
    first = client.chat.completions.create(
        model=model_path, messages=chat(model_path, "Tell me about caches."), max_tokens=12
    )
    assert first.choices[0].message.role == "assistant"
    assert first.usage.completion_tokens == 12 and first.choices[0].finish_reason == "length"
    reply = first.choices[0].message.content
    second = client.chat.completions.create(
        model=model_path, messages=chat(model_path, "Tell me about caches.", reply, "And more?"), max_tokens=5
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    ext = second.usage.model_extra["kvstore"]
    assert cached == ext["cached_ram_tokens"] + ext["cached_disk_tokens"]
    assert cached >= first.usage.prompt_tokens - 1  # the whole first prompt came from memory
    assert ext["cached_ram_tokens"] == cached
    assert ext["prefilled_tokens"] == second.usage.prompt_tokens - cached
    assert ext["conversation"] == first.usage.model_extra["kvstore"]["conversation"]  # the same conversation
    assert ext["conversation"].startswith("anon:")


def test_streaming_chat_matches_non_streaming(server, model_path):
    client = server.openai()
    msgs = chat(model_path, "Stream this please.")
    whole = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=10, temperature=1.0, seed=11)
    chunks = list(
        client.chat.completions.create(
            model=model_path,
            messages=msgs,
            max_tokens=10,
            temperature=1.0,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again


def test_completions_streaming_and_not(server, model_path):
    client = server.openai()
    whole = client.completions.create(model=model_path, prompt="Once upon a time", max_tokens=6)
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    parts = list(
        client.completions.create(
            model=model_path,
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_stop_sequences(server, model_path):
    client = server.openai()
    msgs = chat(model_path, "Say something long.")
    free = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=20, temperature=1.0, seed=5)
    text = free.choices[0].message.content
    assert len(text) > 8
    stop = text[4:7]
    cut = client.chat.completions.create(
        model=model_path, messages=msgs, max_tokens=20, temperature=1.0, seed=5, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=model_path, messages=msgs, max_tokens=20, temperature=1.0, seed=5, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_named_conversation_shows_in_kvstore_agents(server, model_path):
    client = server.openai()
    r = client.chat.completions.create(
        model=model_path,
        messages=chat(model_path, "hi"),
        max_tokens=3,
        extra_headers={"X-Kvstore-Agent": "support-bot"},
    )
    assert r.usage.model_extra["kvstore"]["conversation"] == "support-bot"

    def listed(*flags: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "kvstore.cli", "--store", str(server.store), "agents", "--json", *flags],
            capture_output=True,
            text=True,
            check=True,
        )
        return {a["name"] for a in json.loads(out.stdout)}

    names, every = listed(), listed("--all")  # anonymous conversations are listed apart
    assert "support-bot" in names and not any(n.startswith("anon:") for n in names)
    assert names < every and any(n.startswith("anon:") for n in every)


def test_errors_in_openai_format_and_the_server_keeps_serving(server, model_path):
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=chat(model_path, "hi"), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_path, messages=chat(model_path, "hi"), max_tokens="many")
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_path, messages=chat(model_path, "hi"), n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_path, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_path, messages=chat(model_path, "word " * 40000), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (17 << 20), timeout=60)
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in server.log.read_text()
    ok = client.chat.completions.create(model=model_path, messages=chat(model_path, "still there?"), max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_cache_lookup_stats_and_clear(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store")).start()
    try:
        client = srv.openai()
        msgs = chat(model_path, "Look me up.")
        look = httpx.post(srv.url + "/v1/cache/lookup", json={"messages": msgs}).json()
        assert look["ram_tokens"] == look["disk_tokens"] == 0 and look["prefill_tokens"] == look["prompt_tokens"]
        r = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=4)
        look = httpx.post(srv.url + "/v1/cache/lookup", json={"messages": msgs}).json()
        assert look["prompt_tokens"] == r.usage.prompt_tokens
        assert look["ram_tokens"] == r.usage.prompt_tokens - 1 and look["prefill_tokens"] == 1
        stats = srv.stats()
        assert stats["entries"] == 1 and stats["bytes_on_disk"] > 0 and stats["bytes_in_ram"] > 0
        assert stats["since_start"]["requests"] == 1
        assert stats["since_start"]["prefilled_tokens"] == r.usage.prompt_tokens
        cleared = httpx.delete(srv.url + "/v1/cache").json()
        assert cleared["deleted"] == 1 and cleared["bytes_freed"] > 0
        stats = srv.stats()
        assert stats["entries"] == 0 and stats["bytes_on_disk"] == 0 and stats["bytes_in_ram"] == 0
    finally:
        assert srv.stop() == 0


# -- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_messages_streaming_and_not(server, model_path):
    client = server.anthropic()
    msgs = [{"role": "user", "content": "Hello from an Anthropic client."}]
    system = "Only the Anthropic test uses this system prompt."
    first = client.messages.create(model=model_path, system=system, messages=msgs, max_tokens=8)
    assert first.role == "assistant" and first.stop_reason == "max_tokens"
    assert first.usage.output_tokens == 8 and first.usage.cache_read_input_tokens == 0
    text = first.content[0].text
    nxt = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    with client.messages.stream(model=model_path, system=system, messages=nxt, max_tokens=6) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == streamed and final.usage.output_tokens == 6
    assert final.usage.cache_read_input_tokens >= first.usage.input_tokens - 1
    again = client.messages.create(model=model_path, system=system, messages=nxt, max_tokens=6)
    assert again.content[0].text == streamed


def test_anthropic_stop_sequence_and_errors(server, model_path):
    client = server.anthropic()
    msgs = [{"role": "user", "content": "Stop somewhere."}]
    sampling = {"temperature": 1.0, "top_k": 40, "seed": 9}  # (this SDK version sends them as extra fields)
    free = client.messages.create(model=model_path, messages=msgs, max_tokens=20, extra_body=sampling)
    text = free.content[0].text
    stop = text[3:6]
    cut = client.messages.create(
        model=model_path, messages=msgs, max_tokens=20, extra_body=sampling, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", messages=msgs, max_tokens=2)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=model_path, messages=[], max_tokens=2)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


# -- auth and binding --------------------------------------------------------------------------


def test_api_key_is_required_when_given(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--api-key", KEY).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.openai("wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            srv.anthropic("wrong").messages.create(
                model=model_path, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        assert [m.id for m in srv.openai(KEY).models.list()] == [model_path]
        r = srv.anthropic(KEY).messages.create(
            model=model_path, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        assert r.usage.output_tokens == 2
        assert httpx.get(srv.url + "/health").status_code == 200  # liveness needs no key
        assert httpx.get(srv.url + "/v1/cache/stats").status_code == 401
    finally:
        srv.stop()


def test_binding_off_loopback_needs_an_api_key(tmp_path, model_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.cli",
            "--store",
            str(tmp_path / "s"),
            "serve",
            "--model",
            model_path,
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "--api-key" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was opened


# -- sharing, budget, disconnects, SIGTERM (SIGKILL and restarts: test_server_restarts.py) ---------


def test_conversations_sharing_a_system_prompt_share_its_chunks(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store")).start()
    try:
        client = srv.openai()
        a = client.chat.completions.create(model=model_path, messages=chat(model_path, "First user."), max_tokens=4)
        b = client.chat.completions.create(
            model=model_path, messages=chat(model_path, "Second user here."), max_tokens=4
        )
        assert b.usage.model_extra["kvstore"]["conversation"] != a.usage.model_extra["kvstore"]["conversation"]
        assert b.usage.prompt_tokens_details.cached_tokens >= 2 * TEST_CHUNK  # the system prompt, not prefilled
    finally:
        srv.stop()
    with kvstore.open(srv.store) as store:
        agents = [x for x in store.agents() if x.name.startswith("anon:")]
        assert len(agents) == 2
        fp = agents[0].model
        keys = [kvstore.chunk_keys(fp, store.tokens(x.name), TEST_CHUNK) for x in agents]
        shared = 0
        while keys[0][shared] == keys[1][shared]:
            shared += 1
        assert shared >= 2
        stats = store.stats()
        assert stats.logical_bytes > stats.bytes_on_disk  # the shared chunks are stored once
        assert store.fsck().ok


def test_disk_budget_holds_under_a_stream_of_new_conversations(tmp_path, model_path):
    budget = 450_000  # room for two of these conversations (~180 KB each), not three
    # An agent of the library in the same store: the budget trims conversations, never its snapshots.
    import mlx.core as mx

    from kvstore.testing import make_cache, tokens

    with kvstore.open(new_store(tmp_path / "store")) as store:
        for n in (TEST_CHUNK, 2 * TEST_CHUNK):
            store.save("notes", make_cache("kv", n, mx.float16), tokens(n), model="ab" * 16)
    srv = ServerProcess(model_path, tmp_path / "store", "--max-disk", str(budget)).start()
    try:
        client = srv.openai()
        names = []
        for i in range(10):
            msgs = [
                {"role": "system", "content": f"Conversation {i} has its own long system prompt. " * 8},
                {"role": "user", "content": "Go."},
            ]
            r = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=8)
            names.append(r.usage.model_extra["kvstore"]["conversation"])
            stats = srv.stats()
            assert stats["bytes_on_disk"] <= budget
        assert stats["disk"]["conversations_dropped"] > 0
        assert 0 < stats["entries"] < 10
    finally:
        srv.stop()
    with kvstore.open(srv.store) as store:
        kept = {a.name for a in store.agents()}
        assert names[-1] in kept and names[0] not in kept  # least recently used first
        assert [s.n_tokens for s in store.snapshots("notes")] == [TEST_CHUNK, 2 * TEST_CHUNK]
        assert store.stats().bytes_on_disk <= budget
        assert store.fsck().ok


def test_client_disconnect_mid_stream_stops_generation(server, model_path):
    before = server.stats()["since_start"]["generated_tokens"]
    body = {
        "model": model_path,
        "messages": chat(model_path, "Talk for a very long time."),
        "max_tokens": 3000,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [line for _, line in zip(range(6), lines)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 60
    while "client went away" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "client went away" in server.log.read_text()
    assert server.stats()["since_start"]["generated_tokens"] - before < 3000
    r = server.openai().chat.completions.create(model=model_path, messages=chat(model_path, "Still ok?"), max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_sigterm_finishes_and_saves(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store")).start()
    r = srv.openai().chat.completions.create(model=model_path, messages=chat(model_path, "Bye."), max_tokens=3)
    assert srv.stop(signal.SIGTERM) == 0
    with kvstore.open(srv.store) as store:
        [agent] = store.agents()
        assert agent.n_tokens == r.usage.prompt_tokens + 3
        assert store.fsck().ok


def test_a_queued_stream_gets_keep_alives_and_runs_after_the_request_before_it(tmp_path, model_path):
    from concurrent.futures import ThreadPoolExecutor

    srv = ServerProcess(
        model_path, new_store(tmp_path / "store"), "--keepalive", "0.1", "--max-concurrency", "1"
    ).start()
    try:
        url = srv.url + "/v1/chat/completions"
        long_body = {"model": model_path, "messages": chat(model_path, "A long answer."), "max_tokens": 500}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=long_body, timeout=300)
            while httpx.get(srv.url + "/health").json()["queued"] == 0 and not first.done():
                time.sleep(0.02)  # until the long request holds the model
            body = {
                "model": model_path,
                "messages": chat(model_path, "Short."),
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", url, json=body, timeout=300) as resp:
                lines = [line for line in resp.iter_lines() if line]
            long_reply = first.result().json()
        assert long_reply["usage"]["completion_tokens"] == 500
        assert ": keep-alive" in lines  # sent while the stream waited for the model
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert data[-1]["usage"]["completion_tokens"] == 3 and lines[-1] == "data: [DONE]"
        # The request's log line is written once its response has gone out: the client may read [DONE] first.
        deadline = time.monotonic() + 30
        while "generated 3," not in srv.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.log.read_text()
        assert log.index("generated 500") < log.index("generated 3,")  # served in arrival order
    finally:
        srv.stop()
