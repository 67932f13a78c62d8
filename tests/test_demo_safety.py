"""The demo never touches what it did not create (issue 17), and prints sizes in binary units."""

from __future__ import annotations

import re

import pytest

import kvstore
from kvstore.agents import AgentManager
from kvstore.cli.demo import DemoError, run_demo


@pytest.fixture
def models_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_MODELS", str(tmp_path / "models"))


def test_demo_refuses_a_store_with_a_users_agent_of_a_demo_name(tmp_path, models_home):
    store_path = tmp_path / "mine"
    with kvstore.open(store_path) as store:  # the user's own agent named "tech", of another model
        mgr = AgentManager("builtin:gemma3-tiny", store)
        mgr.create("tech", system_prompt="my own technical agent").chat("hello", max_tokens=3)
        mgr.close()
        before = (store.agent("tech").meta, store.tokens("tech"), len(store.snapshots("tech")))
    lines: list[str] = []
    with pytest.raises(DemoError, match="tech") as e:
        run_demo(store_path, "builtin", session=1, size="tiny", max_tokens=2, echo=lines.append)
    assert "did not create" in str(e.value)
    assert not any("removed" in line for line in lines)
    with kvstore.open(store_path, create=False) as store:
        assert (store.agent("tech").meta, store.tokens("tech"), len(store.snapshots("tech"))) == before
        assert [a.name for a in store.agents()] == ["tech"]  # and no demo agent was added beside it
    with pytest.raises(DemoError, match="tech"):  # session 2 would chat with it: refused too
        run_demo(store_path, "builtin", session=2, size="tiny", max_tokens=2, echo=lines.append)


def test_demo_replaces_its_own_previous_run_and_prints_binary_units(tmp_path, models_home):
    lines: list[str] = []
    for _ in range(2):
        run_demo(tmp_path / "demo", "builtin", session=1, size="tiny", max_tokens=2, echo=lines.append)
    text = "\n".join(lines)
    assert "(removed the previous demo run's agents tech, business, coordinator to start over)" in text
    assert re.search(r"\d MiB", text) and not re.search(r"\d (MB|KB|GB)\b", text)
    with kvstore.open(tmp_path / "demo", create=False) as store:
        assert sorted(a.name for a in store.agents()) == ["business", "coordinator", "tech"]
        assert all(store.agent(n).meta["meta"]["kvstore_demo"] is True for n in ("tech", "business", "coordinator"))
        assert store.fsck().ok


@pytest.mark.slow
def test_kvstore_demo_runs_both_sessions_on_openblas_where_installed(tmp_path):
    """`kvstore demo` from the command line: both sessions say which BLAS they run on, OpenBLAS if present."""
    import os
    import subprocess
    import sys

    from kvstore import blas

    env = dict(os.environ, KVSTORE_MODELS=str(tmp_path / "models"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.cli",
            "demo",
            "--model",
            "builtin",
            "--size",
            "tiny",
            "--max-tokens",
            "2",
            "--store",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    banners = [line for line in done.stdout.splitlines() if line.startswith("Matmuls on: ")]
    assert len(banners) == 2
    expected = (
        "OpenBLAS"
        if sys.platform == "linux" and any(os.path.exists(c) for c in blas.CANDIDATES)
        else "reference BLAS"
        if sys.platform == "linux"
        else "Accelerate"
    )
    assert all(expected in line for line in banners), banners
    assert "RuntimeWarning" not in done.stderr
