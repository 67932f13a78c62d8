"""What `kvstore serve` keeps (issue 27, points 1, 2 and 4): a disk budget on by default that drops anonymous
conversations first and never a pinned or named one out of turn, anonymous conversations that expire, client
pins (Anthropic cache_control) and namespaces (OpenAI prompt_cache_key / user), and the write accounting."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from click.testing import CliRunner
from server_process import ServerProcess, new_store, tiny_model

import kvstore
from kvstore.cli.main import cli
from kvstore.index.location import INDEX_FILE
from kvstore.server.app import PINNED_OVER_BUDGET
from kvstore.server.budget import default_max_disk

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

PINNED_SYSTEM = "You keep the ledger of the harbour and answer in one line. " * 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


def ext(r) -> dict:
    return r.usage.model_extra["kvstore"]


def store_bytes(root: Path) -> int:
    """What --max-disk bounds, measured on disk: the blob files and the index (the full-disk reserve aside)."""
    blobs = sum(p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file())
    index = sum(
        (root / (INDEX_FILE + s)).stat().st_size for s in ("", "-wal", "-shm") if (root / (INDEX_FILE + s)).exists()
    )
    return blobs + index


def anon_chat(client, model: str, i: int):
    msgs = [
        {"role": "system", "content": f"Chat number {i} brings its own long instructions. " * 12},
        {"role": "user", "content": "Go."},
    ]
    return client.chat.completions.create(model=model, messages=msgs, max_tokens=4), msgs


def pinned_request(client, model: str, *more: dict, ttl: str = "1h"):
    system = [{"type": "text", "text": PINNED_SYSTEM, "cache_control": {"type": "ephemeral", "ttl": ttl}}]
    return client.messages.with_raw_response.create(
        model=model, max_tokens=4, system=system, messages=[{"role": "user", "content": "Balance?"}, *more]
    )


@pytest.mark.slow
def test_200_anonymous_chats_stay_under_the_budget_and_keep_the_named_and_the_pinned(tmp_path, model_path):
    budget = 50 * 2**20  # "50M": 50 MiB (kvstore.sizes: K, M, G are binary)
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-disk", "50M").start()
    try:
        client, claude = srv.openai(), srv.anthropic()
        named = [{"role": "system", "content": "You are the keeper. " * 20}, {"role": "user", "content": "Hello."}]
        kept = client.chat.completions.create(
            model=model_path, messages=named, max_tokens=4, extra_headers={"X-Kvstore-Agent": "keeper"}
        )
        assert ext(kept)["conversation"] == "keeper"
        raw = pinned_request(claude, model_path)
        pinned = raw.parse()
        assert pinned.usage.cache_creation_input_tokens == ext(pinned)["pinned_tokens"] > 0
        assert pinned.usage.cache_creation.ephemeral_1h_input_tokens == pinned.usage.cache_creation_input_tokens
        written = 0
        for i in range(200):
            r, msgs = anon_chat(client, model_path, i)
            written += ext(r)["bytes_written"]
            if i == 0:
                first = msgs
        assert written > budget * 1.25  # without the budget the store would hold all of it
        stats = srv.stats()
        assert stats["disk"]["dropped_by"]["budget"] > 20
        assert stats["disk"]["used_bytes"] <= budget and not stats["disk"]["pinned_over_budget"]
        assert stats["writes"]["since_start"] == written + ext(kept)["bytes_written"] + ext(pinned)["bytes_written"]

        named += [{"role": "assistant", "content": kept.choices[0].message.content}, {"role": "user", "content": "Hi?"}]
        again = client.chat.completions.create(
            model=model_path, messages=named, max_tokens=4, extra_headers={"X-Kvstore-Agent": "keeper"}
        )
        assert ext(again)["cached_disk_tokens"] >= kept.usage.prompt_tokens  # restored from the store
        more = [{"role": "assistant", "content": pinned.content[0].text}, {"role": "user", "content": "And now?"}]
        resumed = pinned_request(claude, model_path, *more).parse()
        assert ext(resumed)["conversation"] == ext(pinned)["conversation"]
        assert (
            ext(resumed)["cached_disk_tokens"] >= pinned.usage.cache_creation_input_tokens + pinned.usage.input_tokens
        )
        assert resumed.usage.cache_creation_input_tokens == 0  # the pinned prefix was read, not written again

        gone = client.chat.completions.create(model=model_path, messages=first, max_tokens=4)
        miss = ext(gone)["miss"]
        assert miss["reason"] == "evicted" and miss["evicted_by"] == "budget"
    finally:
        assert srv.stop() == 0
    assert store_bytes(srv.store) < budget
    with kvstore.open(srv.store) as store:
        assert store.fsck().ok
        names = {a.name for a in store.agents()}
        assert "keeper" in names and ext(pinned)["conversation"] in names
    listed = CliRunner().invoke(cli, ["--store", str(srv.store), "agents"], catch_exceptions=False).output
    assert "keeper" in listed and "anon:" not in listed and "anonymous conversation(s) of kvstore serve" in listed
    every = json.loads(CliRunner().invoke(cli, ["--store", str(srv.store), "agents", "--all", "--json"]).output)
    assert {r["name"] for r in every} == names


def test_idle_anonymous_conversations_expire_and_named_ones_stay(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--anon-ttl", "2s").start()
    try:
        client = srv.openai()
        r, msgs = anon_chat(client, model_path, 0)
        client.chat.completions.create(
            model=model_path, messages=msgs, max_tokens=2, extra_headers={"X-Kvstore-Agent": "named"}
        )
        time.sleep(2.5)
        anon_chat(client, model_path, 1)
        stats = srv.stats()
        assert stats["disk"]["dropped_by"] == {"anon_ttl": 1} and stats["disk"]["anon_ttl"] == 2.0
        names = {c["name"] for c in stats["conversations"]}
        assert "named" in names and ext(r)["conversation"] not in names
        back = client.chat.completions.create(model=model_path, messages=msgs[:1] + [msgs[1]], max_tokens=2)
        assert ext(back)["miss"]["reason"] != "evicted"  # the named conversation still has this prompt
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "On."}]
        lost = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=2)
        miss = ext(lost)["miss"]
        assert miss["reason"] == "evicted" and miss["evicted_by"] == "anon_ttl"
        assert miss["conversation_was"] == ext(r)["conversation"]
    finally:
        assert srv.stop() == 0


def test_pins_alone_over_the_budget_are_kept_and_said(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-disk", "1K").start()
    try:
        claude = srv.anthropic()
        raw = pinned_request(claude, model_path, ttl="5m")
        first = raw.parse()
        assert raw.headers.get(PINNED_OVER_BUDGET) == "true"
        u = first.usage
        assert u.cache_creation.ephemeral_5m_input_tokens == u.cache_creation_input_tokens > 0
        e = ext(first)
        prompt_tokens = e["cached_ram_tokens"] + e["cached_disk_tokens"] + e["prefilled_tokens"]
        assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == prompt_tokens
        r, _ = anon_chat(srv.openai(), model_path, 0)  # unpinned: dropped at the next turn
        second = pinned_request(claude, model_path, ttl="5m")
        again = second.parse()
        assert second.headers.get(PINNED_OVER_BUDGET) == "true"
        assert again.usage.cache_creation_input_tokens == 0
        assert again.usage.input_tokens == 1  # all but the last prompt token read from the cache
        names = {c["name"] for c in srv.stats()["conversations"]}
        assert ext(first)["conversation"] in names and ext(r)["conversation"] not in names
    finally:
        assert srv.stop() == 0
    assert srv.log.read_text().count("the pins alone exceed the budget") == 1  # warned once, not per request


def test_namespaces_group_conversations_under_their_own_quota(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--namespace-quota", "600K").start()
    try:
        client = srv.openai()
        team = []
        for i in range(4):
            msgs = [
                {"role": "system", "content": f"Team chat {i} with its own long instructions. " * 12},
                {"role": "user", "content": "Go."},
            ]
            r = client.chat.completions.create(
                model=model_path, messages=msgs, max_tokens=2, extra_body={"prompt_cache_key": "team-a"}
            )
            team.append(ext(r)["conversation"])
        # The same prompt in another namespace: a conversation of its own.
        bob = client.chat.completions.create(model=model_path, messages=msgs, max_tokens=2, user="bob")
        assert all(n.startswith("key:team-a:") for n in team) and ext(bob)["conversation"].startswith("key:bob:")
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "On."}]
        on = client.chat.completions.create(
            model=model_path, messages=msgs, max_tokens=2, extra_body={"prompt_cache_key": "team-a"}
        )
        assert ext(on)["conversation"] == team[-1]  # its own namespace's conversation, not bob's equal one
        stats = srv.stats()
        rows = {c["name"]: c for c in stats["conversations"]}
        assert stats["disk"]["dropped_by"]["namespace_quota"] >= 1
        assert team[0] not in rows and team[-1] in rows and ext(bob)["conversation"] in rows
        assert rows[team[-1]]["namespace"] == "team-a" and not rows[team[-1]]["anonymous"]
    finally:
        assert srv.stop() == 0


def test_writes_are_counted_per_turn_conversation_and_day_and_capped(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "store"), "--max-writes-per-day", "100K").start()
    try:
        client = srv.openai()
        r1, _ = anon_chat(client, model_path, 1)
        assert ext(r1)["bytes_written"] > 100_000  # a turn that starts under the cap saves in full
        r2, _ = anon_chat(client, model_path, 2)
        r3, _ = anon_chat(client, model_path, 3)
        assert ext(r2)["bytes_written"] == ext(r3)["bytes_written"] == 0  # served from memory only
        assert r3.usage.completion_tokens == 4
        stats = srv.stats()
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert stats["writes"]["by_day"] == {today: ext(r1)["bytes_written"]} and stats["writes"]["limit_reached"]
        rows = {c["name"]: c for c in stats["conversations"]}
        assert rows[ext(r1)["conversation"]]["bytes_written"] == ext(r1)["bytes_written"]
    finally:
        assert srv.stop() == 0
    assert srv.log.read_text().count("--max-writes-per-day") == 1  # warned once
    store = str(srv.store)
    du = json.loads(CliRunner().invoke(cli, ["--store", store, "du", "--json"], catch_exceptions=False).output)
    assert {r["name"]: r["bytes_written"] for r in du}[ext(r1)["conversation"]] == ext(r1)["bytes_written"]
    info = json.loads(CliRunner().invoke(cli, ["--store", store, "info", "--json"]).output)
    assert info["writes_by_day"] == {today: ext(r1)["bytes_written"]}
    text = CliRunner().invoke(cli, ["--store", store, "du"]).output
    assert "WRITTEN" in text and f"written per day (UTC): {today}" in text


def test_the_budget_is_on_by_default_and_none_turns_it_off(tmp_path, model_path):
    assert default_max_disk(400 << 30) == 30 << 30 and default_max_disk(40 << 30) == 10 << 30
    srv = ServerProcess(model_path, new_store(tmp_path / "store")).start()
    try:
        free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
        max_disk = srv.stats()["disk"]["max_disk"]
        assert max_disk == pytest.approx(min(30 << 30, free // 4), rel=0.01)
    finally:
        assert srv.stop() == 0
    srv = ServerProcess(model_path, srv.store, "--max-disk", "none").start()
    try:
        assert srv.stats()["disk"]["max_disk"] is None
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        assert srv.stop() == 0
