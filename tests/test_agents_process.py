"""Agents across process boundaries: a conversation resumed in a new process, and the two-session demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_CHUNK
from test_agents import ARCHS, handles, model_paths, preamble  # noqa: F401  (session fixtures)

import kvstore
from kvstore.agents import AgentManager
from kvstore.cli.demo import main as demo_main
from kvstore.cli.demo import run_demo

QUESTIONS = ["What failed in the payment API?", "Which merchants are affected?", "What do we do first?"]

WORKER = r"""
import json, sys
import kvstore
from kvstore.agents import AgentManager

model, store_path, chunk, create, system, questions = json.loads(sys.argv[1])
with kvstore.open(store_path, chunk_size=chunk) as store:
    mgr = AgentManager(model, store)
    agent = mgr.create("agent", system) if create else mgr.get("agent")
    out = []
    for q in questions:
        r = agent.chat(q, max_tokens=12)
        out.append({"tokens": list(r.tokens), "stats": r.stats.as_dict()})
print(json.dumps(out))
"""


def run_worker(model, store_path, create: bool, system: str, questions: list[str]) -> list[dict]:
    """Run some turns of the agent in a new Python process; its replies."""
    arg = json.dumps([str(model), str(store_path), TEST_CHUNK, create, system, questions])
    done = subprocess.run([sys.executable, "-c", WORKER, arg], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_resume_in_new_process_matches_uninterrupted(tmp_path, model_paths, handles, arch):  # noqa: F811
    path = model_paths[arch]
    system = preamble(handles[arch])
    with kvstore.open(tmp_path / "straight", chunk_size=TEST_CHUNK) as store:
        agent = AgentManager(path, store).create("agent", system)
        straight = [list(agent.chat(q, max_tokens=12).tokens) for q in QUESTIONS]

    assert all(len(t) > 4 for t in straight)  # real replies, not an immediate end of turn: the comparison bites
    first = run_worker(path, tmp_path / "split", True, system, QUESTIONS[:1])
    rest = run_worker(path, tmp_path / "split", False, system, QUESTIONS[1:])
    assert [r["tokens"] for r in first + rest] == straight
    resumed = rest[0]["stats"]
    assert resumed["source"] == "store"
    assert resumed["restored_tokens"] > first[0]["stats"]["prompt_tokens"] - TEST_CHUNK
    with kvstore.open(tmp_path / "split") as store:
        assert store.fsck().ok
        assert len(store.snapshots("agent")) == 1 + len(QUESTIONS)  # created, then one autosave per turn


@pytest.mark.slow
def test_demo_runs_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    lines: list[str] = []
    results = run_demo(
        tmp_path / "demo-store",
        "builtin",
        session=None,
        size="tiny",
        max_tokens=6,
        echo=lines.append,
        json_out=tmp_path / "demo.json",
    )
    text = "\n".join(lines)
    assert "RANDOM weights" in text and "gibberish" in text
    one, two = results["session1"], results["session2"]
    assert one["pid"] != two["pid"] == json.loads((tmp_path / "demo.json").read_text())["session2"]["pid"]
    assert one["pid"] == os.getpid()
    assert one["agents"]["tech"]["source"] == "cold"
    assert one["agents"]["business"]["restored_tokens"] > 0  # warm start on the shared preamble
    for name, stats in two["agents"].items():
        assert stats["source"] == "store", name
        assert stats["restored_tokens"] >= one["agents"][name]["prompt_tokens"] - 256
        assert stats["session1_cold_ttft"] > 0 and stats["speedup"] > 0
    assert one["store_stats"]["dedup_ratio"] > 1.0
    # The demo explains its ratio: one file per agent = the heads' distinct chunks + what sharing saves, and
    # the disk = those chunks + what only older snapshots use (none in session 1, session 1's tails in 2).
    for st in (one["store_stats"], two["store_stats"]):
        assert st["logical_bytes"] == st["head_bytes"] + st["shared_saving_bytes"]
        assert st["bytes_on_disk"] == st["head_bytes"] + st["older_snapshot_bytes"]
        assert st["shared_saving_bytes"] > 0
    assert one["store_stats"]["older_snapshot_bytes"] == 0 < two["store_stats"]["older_snapshot_bytes"]
    assert two["store_stats"]["dedup_ratio"] < one["store_stats"]["dedup_ratio"]
    assert "shared chunks: the whole" in text and "saving" in text
    assert one["memory"]["model_bytes"] > 0 and one["memory"]["rss_bytes"] > 0
    assert "What are the detailed steps to fix that API bug?" in text
    with kvstore.open(tmp_path / "demo-store") as store:
        assert store.fsck().ok


def test_demo_session_two_needs_session_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))
    assert (
        demo_main(["--session", "2", "--store", str(tmp_path / "empty"), "--model", "builtin", "--size", "tiny"]) == 1
    )
    assert "run session 1 first" in capsys.readouterr().err
