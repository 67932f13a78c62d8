"""System-level differential test (issue 25): seeded random multi-agent walks through the agent manager,
SIGKILLed at random points, against an oracle that never restarts; every reply's token ids must match.

See reliability/differential.py for the walk. One walk per model family: create, chat (most steps,
a few greedy tokens each), fork, export/import (kept apart, trusted or verified), export-mlx/import-mlx,
gc, delete, clean restarts and SIGKILLs about every 50 steps; fsck clean after every restart.
"""

from __future__ import annotations

import pytest

from . import report
from .differential import Walk

# Built-in model families the walks run over ("builtin:ARCH-SIZE"), one list per walk.
AGENT_MODELS = ["builtin:llama-tiny", "builtin:gemma3-tiny", "builtin:qwen3_next-tiny"]
SERVER_MODELS = ["builtin:llama-tiny", "builtin:gemma3-tiny", "builtin:qwen3_next-tiny"]
STEPS = 500  # per model family (issue 25: at least 500 random steps per family)
SEED = 25


def model_folder(name: str, root) -> str:
    """The folder of built-in model `name` ("builtin:ARCH-SIZE"), built under the test's temp folder."""
    from kvstore.models.builtin import builtin_model_path

    arch, _, size = name.partition(":")[2].partition("-")
    return str(builtin_model_path(arch=arch, size=size or "tiny", root=root))


@pytest.mark.slow
@pytest.mark.parametrize("model", AGENT_MODELS)
def test_agent_manager_walk_matches_oracle(model, tmp_path):
    walk = Walk(model_folder(model, tmp_path / "models"), tmp_path, seed=SEED)
    stats = walk.run(STEPS)
    assert walk.differences == [], walk.differences[:3]
    assert stats["steps"] == STEPS
    # The walk did what it is for: many compared replies, restarts by SIGKILL, commands lost in flight.
    assert stats["replies_compared"] >= STEPS // 2
    assert stats["kills"] >= 3 and stats["fsck_clean"] == stats["kills"] + stats["clean_restarts"] + 1
    for op in ("create", "fork", "delete", "archive", "mlx", "gc"):
        assert stats[f"{op}_steps"] > 0, op
    report.record(f"differential_agents_{model}", differences=len(walk.differences), **stats)


SERVER_STEPS = 120  # per model family: HTTP turns cost more than the manager's; restarts ~every 40 steps


@pytest.mark.slow
@pytest.mark.parametrize("model", SERVER_MODELS)
def test_server_walk_matches_oracle(model, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("anthropic")
    from .differential_server import ServerWalk

    walk = ServerWalk(model_folder(model, tmp_path / "models"), tmp_path, seed=SEED)
    stats = walk.run(SERVER_STEPS)
    assert walk.differences == [], walk.differences[:3]
    assert stats["steps"] == SERVER_STEPS and stats["replies_compared"] >= SERVER_STEPS // 2
    assert stats["kills"] + stats["clean_restarts"] >= 2
    for kind in ("openai_turns", "stream_turns", "anthropic_turns", "fork_steps", "clear_steps"):
        assert stats[kind] > 0, kind
    report.record(f"differential_server_{model}", differences=len(walk.differences), **stats)
