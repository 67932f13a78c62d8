"""`kvstore serve` with concurrent clients: turns generated together reply as they do alone, and save what they saw."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import mlx.core as mx
import numpy as np
import pytest
from server_process import ServerProcess, new_store, tiny_model

import kvstore
from kvstore.agents import resolve_model, turn

openai = pytest.importorskip("openai")

PREAMBLE = "The team shares this long briefing about the project, its goals and its rules. " * 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


def agent_system(i: int) -> str:
    return PREAMBLE + f"You are specialist number {i}."


def two_turns(srv: ServerProcess, model: str, i: int, max_tokens: int = 12) -> list[str]:
    """Agent i's two greedy streamed turns (openai SDK); the reply texts."""
    client = srv.openai()
    msgs = [{"role": "system", "content": agent_system(i)}]
    replies = []
    for t in range(2):
        msgs.append({"role": "user", "content": f"Agent {i}, step {t}: report."})
        stream = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=max_tokens, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        msgs.append({"role": "assistant", "content": text})
        replies.append(text)
    return replies


def most_together(log: str) -> int:
    return max((int(n) for n in re.findall(r"(\d+) decoding together", log)), default=0)


def test_concurrent_conversations_reply_as_alone_and_save_the_cache_of_their_tokens(tmp_path, model_path):
    n = 6
    alone = ServerProcess(model_path, new_store(tmp_path / "alone"), "--max-concurrency", "1").start()
    try:
        want = [two_turns(alone, model_path, i) for i in range(n)]
    finally:
        alone.stop()
    srv = ServerProcess(model_path, new_store(tmp_path / "batch"), "--max-resident", str(n)).start()
    try:
        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda i: two_turns(srv, model_path, i), range(n)))
        log = srv.log.read_text()
    finally:
        assert srv.stop() == 0
    assert got == want
    assert most_together(log) >= 2  # the turns really shared decode steps
    handle = resolve_model(model_path)
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
        convs = [a for a in store.agents() if a.name.startswith("anon:")]
        assert len(convs) == n
        for info in convs:
            cache, tokens = store.load(info.name, model=handle.fingerprint)
            cold = handle.make_cache()
            turn.prefill(handle.model, cold, tokens, 0, len(tokens), 512, None)
            mx.eval([c.state for c in cold])
            for mine, ref in zip(cache, cold):  # the saved cache is the cache of exactly the saved tokens
                assert mine.offset == ref.offset == len(tokens)
                assert np.allclose(np.array(mine.state[0]), np.array(ref.state[0][..., : ref.offset, :]), atol=1e-4)


def test_a_client_that_goes_away_frees_its_slot_at_once(tmp_path, model_path):
    """With one slot, a second request waits; closing the first stream lets it start without waiting the long reply."""
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-concurrency", "1").start()
    try:
        body = {
            "model": model_path,
            "messages": [{"role": "user", "content": "Talk for a very long time."}],
            "max_tokens": 5000,
            "stream": True,
        }
        short = {"model": model_path, "messages": [{"role": "user", "content": "Short."}], "max_tokens": 3}
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as resp:
                lines = resp.iter_lines()  # held: a dropped iterator would close the stream itself
                next(line for line in lines if line.startswith("data: "))
                waiting = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=short, timeout=300)
                deadline = time.monotonic() + 60
                while httpx.get(srv.url + "/health").json()["queued"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert not waiting.done()  # it waits for the one slot
            r = waiting.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert srv.stats()["since_start"]["generated_tokens"] < 5000  # the long reply stopped when its client left
    finally:
        assert srv.stop() == 0
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok


@pytest.mark.slow
def test_twenty_clients_with_random_disconnects(tmp_path, model_path):
    """20 clients for 2 minutes (issue 26): new and continued conversations, streams cut at random. No 5xx, no wrong reply, fsck clean."""
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-concurrency", "8").start()
    statuses: list[int] = []
    complete: dict[int, str] = {}  # client -> its first question's full greedy reply
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def client(c: int) -> None:
        rng = random.Random(c)
        msgs = [{"role": "system", "content": agent_system(c)}]
        first = True
        while time.monotonic() < deadline:
            msgs.append({"role": "user", "content": f"Client {c} asks question {len(msgs)}."})
            body = {"model": model_path, "messages": msgs, "max_tokens": rng.choice([4, 16, 40]), "stream": True}
            body["temperature"] = 0
            if first:
                body["max_tokens"] = 16
            cut = rng.random() < 0.3 and not first
            text = ""
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as resp:
                with lock:
                    statuses.append(resp.status_code)
                for i, line in enumerate(resp.iter_lines()):
                    if cut and i >= rng.randint(1, 6):
                        break  # the client goes away mid-stream
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        text += "".join(ch["delta"].get("content") or "" for ch in chunk["choices"])
            if cut:
                msgs = msgs[:1] if rng.random() < 0.5 else msgs[:-1]  # start over, or ask again
                continue
            if first:
                with lock:
                    complete[c] = text
                first = False
            msgs.append({"role": "assistant", "content": text})
            if rng.random() < 0.2:
                msgs = msgs[:1]  # a new conversation with the same system prompt

    try:
        with ThreadPoolExecutor(20) as pool:
            for f in [pool.submit(client, c) for c in range(20)]:
                f.result()
        log = srv.log.read_text()
        assert srv.stop(signal.SIGTERM) == 0
    finally:
        if srv.proc is not None:
            srv.stop()
    assert statuses and all(s < 500 for s in statuses)
    assert "client went away" in log and most_together(log) >= 4  # streams were cut while others decoded
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
    alone = ServerProcess(model_path, new_store(tmp_path / "alone"), "--max-concurrency", "1").start()
    try:
        client_ = alone.openai()
        for c, text in complete.items():
            msgs = [
                {"role": "system", "content": agent_system(c)},
                {"role": "user", "content": f"Client {c} asks question 1."},
            ]
            r = client_.chat.completions.create(model=model_path, messages=msgs, max_tokens=16, temperature=0)
            assert r.choices[0].message.content == text
    finally:
        alone.stop()
