"""The disk budget's order, in process on the built-in tiny model: anonymous conversations go before named
ones, least recently used first; a pinned one stays within its ttl; an agent the server did not create is
never touched; an idle anonymous one expires."""

from __future__ import annotations

import pytest
from conftest import TEST_CHUNK

import kvstore
from kvstore.agents import AgentManager, GenerationOptions
from kvstore.agents import turn as turn_mod
from kvstore.index import wal
from kvstore.server.budget import DiskBudget
from kvstore.server.conversations import Conversations, TurnRequest
from kvstore.server.retention import Pin
from kvstore.server.worker import Job


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(tmp_path):
    from kvstore.models.builtin import builtin_model_path

    model = builtin_model_path(root=tmp_path / "models")
    store = kvstore.open(tmp_path / "store", chunk_size=TEST_CHUNK)
    mgr = AgentManager(str(model), store, max_resident=1, share_resident=True)
    clock = Clock()
    budget = DiskBudget(store, mgr, None, 0, anon_ttl=3600.0, clock=clock)
    yield Conversations(mgr, budget), clock
    mgr.close()
    assert store.fsck().ok
    store.close()


def turn(conv: Conversations, i: int, named: str | None = None, pins: bool = False, namespace: str | None = None):
    msgs = [
        {"role": "system", "content": f"Conversation {i} has long instructions. " * 10},
        {"role": "user", "content": "Go."},
    ]
    prompt = turn_mod.render(conv.manager.tokenizer, msgs)
    req = TurnRequest(prompt, msgs, GenerationOptions(max_tokens=2), named, namespace=namespace)
    if pins:
        req.pins = [Pin(len(prompt) - 4, "5m")]
    return conv.run(req, Job(lambda job: None, None)).conversation


def names(conv: Conversations) -> set[str]:
    return {a.name for a in conv.conversations()}


def test_anonymous_go_first_the_pinned_and_foreign_never(served):
    conv, clock = served
    store = conv.store
    import mlx.core as mx

    from kvstore.testing import make_cache, tokens

    store.save("notes", make_cache("kv", 2 * TEST_CHUNK, mx.float16), tokens(2 * TEST_CHUNK), model="ab" * 16)
    named = turn(conv, 0, named="keeper")
    clock.now += 1
    pinned = turn(conv, 1, pins=True)
    anon = []
    for i in range(2, 6):
        clock.now += 1
        anon.append(turn(conv, i))
    # Room for what is there (and the index's growth), not for one more conversation. (The index's WAL
    # truncated first: the budget truncates it before it counts the store as over.)
    wal.checkpoint(store.engine, truncate=True)
    conv.budget.max_disk = conv.budget.used() + 64 * 1024
    clock.now += 1
    last = turn(conv, 6)
    kept = names(conv)
    assert {named, pinned, last} <= kept and "notes" in {a.name for a in store.agents()}
    assert anon[0] not in kept and anon[-1] in kept  # least recently used first
    assert conv.budget.dropped_by["budget"] == len(set(anon) - kept) >= 1
    assert conv.budget.used() <= conv.budget.max_disk

    conv.budget.max_disk = 1  # nothing fits: every anonymous one goes, then the named one; never the pinned
    clock.now += 1
    turn(conv, 7)
    assert pinned in names(conv) and named not in names(conv) and conv.budget.pinned_over_budget
    clock.now += 301  # the 5-minute pin ran out
    newest = turn(conv, 8)
    assert pinned not in names(conv) and names(conv) == {newest} and not conv.budget.pinned_over_budget
    assert [s.n_tokens for s in store.snapshots("notes")] == [2 * TEST_CHUNK]


def test_idle_anonymous_conversations_expire(served):
    conv, clock = served
    old = turn(conv, 0)
    named = turn(conv, 1, named="keeper")
    clock.now += 3601
    new = turn(conv, 2)
    assert names(conv) == {named, new} and conv.budget.dropped_by == {"anon_ttl": 1}
    assert old not in names(conv)


def test_a_namespace_over_its_quota_loses_its_oldest(served):
    conv, clock = served
    team = []
    for i in range(3):
        clock.now += 1
        team.append(turn(conv, i, namespace="team-a"))
    other = turn(conv, 9, namespace="team-b")
    sizes = conv.store.agent_bytes()
    conv.budget.namespace_quota = sizes[team[1]].total_bytes + sizes[team[2]].total_bytes
    clock.now += 1
    team.append(turn(conv, 3, namespace="team-a"))
    assert names(conv) == {team[2], team[3], other} and conv.budget.dropped_by == {"namespace_quota": 2}
