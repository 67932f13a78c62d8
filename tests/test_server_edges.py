"""The server's edge cases from the audit of issue 25, each through a real `kvstore serve` process and the
official SDKs (or httpx where no SDK sends the request): a client's mistake is a 400 that names it, never
a 500 or minutes of the model thread; clearing the cache leaves the store's other agents alone."""

from __future__ import annotations

import httpx2 as httpx  # the HTTP client the openai and anthropic SDKs are built on
import mlx.core as mx
import pytest
from conftest import TEST_CHUNK
from server_process import ServerProcess, chat, new_store, tiny_model

import kvstore
from kvstore.testing import make_cache, tokens

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

MB = "x" * (1 << 20)
USER = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    store = new_store(tmp_path_factory.mktemp("edges") / "store")
    srv = ServerProcess(model_path, store, "--max-disk", "10G").start()
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log.read_text()
    with kvstore.open(srv.store) as s:
        assert s.fsck().ok


def bad_request(call, exc, param: str | None = None) -> str:
    """The 400's message, after checking the body names `param` (OpenAI's error format)."""
    with pytest.raises(exc) as e:
        call()
    assert e.value.status_code == 400
    body = e.value.body
    if param is not None:
        assert body["param"] == param
    return body["message"] if "message" in body else body["error"]["message"]


def test_sizes_mean_binary_units_in_serve(server):
    """`--max-disk 10G` is 10 x 2^30 bytes, as `--cache-size 10G` is (it was 10^10)."""
    assert server.stats()["disk"]["max_disk"] == 10 * 2**30


def test_clearing_the_cache_keeps_every_snapshot_of_the_stores_other_agents(server, model_path):
    with kvstore.open(server.store) as store:
        for n in (2, 3, 4, 5):  # an agent the server does not own, four snapshots
            store.save(
                "notes", make_cache("kv", n * TEST_CHUNK, mx.float16, seed=n), tokens(n * TEST_CHUNK), model="5a" * 16
            )
        client = server.openai()
        client.chat.completions.create(model=model_path, messages=chat(model_path, "Clear me."), max_tokens=3)
        cleared = httpx.delete(server.url + "/v1/cache", timeout=60).json()
        assert cleared["deleted"] >= 1
        assert [s.n_tokens for s in store.snapshots("notes")] == [n * TEST_CHUNK for n in (2, 3, 4, 5)]
        assert server.stats()["entries"] == 0


def test_stop_strings_are_limited_in_number_and_length(server, model_path):
    """A 1 MB stop string is refused at once (it held the model thread for minutes); so are too many."""
    client, msgs = server.openai(), chat(model_path, "Stop here.")
    create = client.chat.completions.create
    message = bad_request(
        lambda: create(model=model_path, messages=msgs, max_tokens=8, stop=MB), openai.BadRequestError, "stop"
    )
    assert "at most 1000 characters" in message
    bad_request(
        lambda: create(model=model_path, messages=msgs, max_tokens=8, stop=[MB], stream=True),
        openai.BadRequestError,
        "stop",
    )
    bad_request(
        lambda: create(model=model_path, messages=msgs, max_tokens=8, stop=list("abcde")),
        openai.BadRequestError,
        "stop",
    )
    bad_request(
        lambda: client.completions.create(model=model_path, prompt="Once", max_tokens=8, stop=[MB]),
        openai.BadRequestError,
        "stop",
    )
    an = server.anthropic().messages.create
    message = bad_request(
        lambda: an(model=model_path, messages=USER, max_tokens=8, stop_sequences=[MB]), anthropic.BadRequestError
    )
    assert "stop_sequences[0]" in message and "1000 characters" in message
    message = bad_request(
        lambda: an(model=model_path, messages=USER, max_tokens=8, stop_sequences=[f"s{i}" for i in range(17)]),
        anthropic.BadRequestError,
    )
    assert "at most 16" in message
    # Within the limits: four long stop strings that never appear leave the reply whole.
    free = create(model=model_path, messages=msgs, max_tokens=8)
    long_stops = [c * 1000 for c in "wxyz"]
    held = create(model=model_path, messages=msgs, max_tokens=8, stop=long_stops)
    assert held.choices[0].message.content == free.choices[0].message.content
    assert held.choices[0].finish_reason == "length"


@pytest.mark.parametrize("seed", [-1, 2**64, -(2**70)])
def test_a_seed_outside_mlxs_range_is_a_400(server, model_path, seed):
    create = server.openai().chat.completions.create
    bad_request(
        lambda: create(model=model_path, messages=USER, max_tokens=2, seed=seed), openai.BadRequestError, "seed"
    )
    message = bad_request(
        lambda: server.anthropic().messages.create(
            model=model_path, messages=USER, max_tokens=2, extra_body={"seed": seed}
        ),
        anthropic.BadRequestError,
    )
    assert message.startswith("seed:")


def test_the_largest_seed_is_served(server, model_path):
    r = server.openai().chat.completions.create(
        model=model_path, messages=USER, max_tokens=2, temperature=1.0, seed=2**64 - 1
    )
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "calls",
    [
        "get_weather",
        {"function": {"name": "f"}},
        [1],
        ["f"],
        [{}],
        [{"function": "f"}],
        [{"function": {"name": 7, "arguments": "{}"}}],
        [{"function": {"name": "f", "arguments": 5}}],
        [{"id": 5, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    ],
    ids=["string", "object", "int", "str-item", "empty", "function-string", "name-int", "args-int", "id-int"],
)
def test_malformed_assistant_tool_calls_are_a_400(server, model_path, calls):
    msgs = [*USER, {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "user", "content": "And?"}]
    create = server.openai().chat.completions.create
    message = bad_request(lambda: create(model=model_path, messages=msgs, max_tokens=2), openai.BadRequestError)
    assert message.startswith("messages[1].tool_calls")
    look = httpx.post(server.url + "/v1/cache/lookup", json={"messages": msgs}, timeout=60)
    assert look.status_code == 400 and look.json()["error"]["message"].startswith("messages[1].tool_calls")


def test_well_formed_tool_calls_still_render(server, model_path):
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    msgs = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    r = server.openai().chat.completions.create(model=model_path, messages=msgs, max_tokens=2)
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"messages": [1]}', "messages[0] must be an object"),
        (b'{"messages": [{"role": "user", "content": "x"}, "y"]}', "messages[1] must be an object"),
    ],
    ids=["deep-array", "deep-messages", "int-message", "str-message"],
)
def test_cache_lookup_answers_400_where_the_chat_route_does(server, model_path, body, said):
    look = httpx.post(server.url + "/v1/cache/lookup", content=body, timeout=60)
    assert look.status_code == 400 and said in look.json()["error"]["message"]
    chat_body = body if body.startswith(b"[") else body[:-1] + f', "model": "{model_path}"}}'.encode()
    assert httpx.post(server.url + "/v1/chat/completions", content=chat_body, timeout=60).status_code == 400


def test_a_header_cannot_name_a_conversation_in_the_reserved_anon_space(server, model_path):
    client = server.openai()
    first = client.chat.completions.create(model=model_path, messages=chat(model_path, "Anonymous."), max_tokens=3)
    taken = first.usage.model_extra["kvstore"]["conversation"]
    assert taken.startswith("anon:")
    with kvstore.open(server.store) as store:
        before = [s.n_tokens for s in store.snapshots(taken)]
    create = client.chat.completions.create
    for name in (taken, "anon:mine"):
        headers = {"X-Kvstore-Agent": name}
        message = bad_request(
            lambda h=headers: create(model=model_path, messages=USER, max_tokens=2, extra_headers=h),
            openai.BadRequestError,
            "X-Kvstore-Agent",
        )
        assert "reserved" in message
        bad_request(
            lambda h=headers: create(model=model_path, messages=USER, max_tokens=2, stream=True, extra_headers=h),
            openai.BadRequestError,
            "X-Kvstore-Agent",
        )
        bad_request(
            lambda h=headers: client.completions.create(model=model_path, prompt="Hi", max_tokens=2, extra_headers=h),
            openai.BadRequestError,
            "X-Kvstore-Agent",
        )
        message = bad_request(
            lambda h=headers: server.anthropic().messages.create(
                model=model_path, messages=USER, max_tokens=2, extra_headers=h
            ),
            anthropic.BadRequestError,
        )
        assert "reserved" in message
    with kvstore.open(server.store) as store:
        assert [s.n_tokens for s in store.snapshots(taken)] == before
        assert "anon:mine" not in {a.name for a in store.agents()}
    # An invalid name in a streaming request is a 400 too, before the stream starts.
    bad_request(
        lambda: client.chat.completions.create(
            model=model_path, messages=USER, max_tokens=2, stream=True, extra_headers={"X-Kvstore-Agent": "../up"}
        ),
        openai.BadRequestError,
        "X-Kvstore-Agent",
    )
