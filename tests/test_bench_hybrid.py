"""benchmarks.bench_hybrid's byte count: what a state checkpoint and a KV chunk take on disk, read from a real
store's index after a real agent turn on the tiny built-in models."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache

import kvstore
from benchmarks.bench_hybrid import QUESTION_1, disk_bytes, filler, model_path, role
from kvstore.agents import AgentManager, resolve_model


def raw_bytes(handle) -> tuple[int, int]:
    """(KV bytes of one 256-token chunk over the attention layers, bytes of one copy of every recurrent state)."""
    cache = handle.make_cache()
    handle.model(mx.array([list(range(1, 257))]), cache=cache)
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache if not isinstance(c, ArraysCache))
    state = sum(a.nbytes for c in cache if isinstance(c, ArraysCache) for a in c.cache if a is not None)
    return kv, state


@pytest.mark.parametrize("arch", ["qwen3_next", "llama"])
def test_disk_bytes_counts_each_blob_once(tmp_path, arch):
    handle = resolve_model(model_path(arch, "tiny"))
    store = kvstore.open(tmp_path / "s")
    agent = AgentManager(handle, store).create("a", filler(handle.tokenizer, 1100, "h") + role("A"))
    agent.chat(QUESTION_1, max_tokens=8)
    store.close()
    d = disk_bytes(tmp_path / "s", handle)
    kv, state = raw_bytes(handle)
    # A chunk's file holds all its attention layers: counted once it is its arrays plus a small header.
    assert kv <= d["kv_bytes_per_chunk"] < kv * 1.05
    if arch == "llama":
        assert (d["state_slots"], d["checkpoints"], d["bytes_per_checkpoint"]) == (0, 0, 0)
    else:
        # The system prompt's last chunk boundary and the turn's end; one blob per recurrent layer.
        assert d["checkpoints"] == 2 and d["state_slots"] == 3
        assert state <= d["bytes_per_checkpoint"] < state * 1.1
