"""Concurrency: savers sharing prefixes and a gc(grace=0) loop, as processes and as threads.

No error may reach a caller, every agent's head is its last committed save, bit-exact, and fsck is
clean at the end. grace=0 is the hardest case: gc may take any file not yet named by a committed
row, so the save path's re-check under the write lock (kvstore.ops.save) is all that protects it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kvstore

from . import report, stress, synth
from .oracle import TESTS_DIR

WORKERS, SAVES = 4, 50


def check_final(path, results: dict, **open_kw) -> int:
    """Every agent's head is what its saver last committed; gc then fsck are clean. Returns agents checked.
    (test_postgres.py runs it on a PostgreSQL URL with blobs=.)"""
    n = 0
    with kvstore.open(path, **open_kw) as store:
        expected = {name: toks for w in range(WORKERS) for name, toks in results[w]["agents"].items()}
        assert sorted(a.name for a in store.agents()) == sorted(expected)
        for name, tokens in expected.items():
            cache, got = store.load(name, model=synth.FP)
            assert got == tokens
            assert synth.checksum(cache) == synth.expected_sum(tokens)
            n += 1
        assert store.fsck().problems == ()
        store.gc(grace=0)
        assert store.fsck(grace=0).problems == ()
        assert list(store.blobs.iter_temp()) == []
    return n


@pytest.mark.slow
def test_processes_save_while_gc_loops(tmp_path):
    path = tmp_path / "store"
    kvstore.open(path, chunk_size=synth.CHUNK).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    stop = tmp_path / "stop"
    cmd = [sys.executable, "-m", "reliability.stress"]
    gc_proc = subprocess.Popen(
        cmd + ["gc", str(path), str(stop), str(tmp_path / "gc.json")],
        env=env,
        cwd=TESTS_DIR,
        stderr=subprocess.PIPE,
        text=True,
    )
    savers = [
        subprocess.Popen(
            cmd + ["saver", str(path), str(w), str(SAVES), str(100 + w), str(tmp_path / f"w{w}.json")],
            env=env,
            cwd=TESTS_DIR,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    errors = [(p.args[3:5], p.communicate(timeout=600)[1]) for p in savers]
    stop.touch()
    gc_err = gc_proc.communicate(timeout=600)[1]
    assert [(w, e) for w, e in errors if e] == []
    assert gc_err == ""
    assert [p.returncode for p in savers + [gc_proc]] == [0] * (WORKERS + 1)
    results = {w: json.loads((tmp_path / f"w{w}.json").read_text()) for w in range(WORKERS)}
    gc_passes = json.loads((tmp_path / "gc.json").read_text())["passes"]
    agents = check_final(path, results)
    assert gc_passes > 0
    report.record(
        "concurrency_processes",
        saves=WORKERS * SAVES,
        writers=WORKERS,
        gc_passes=gc_passes,
        agents_verified=agents,
        cross_checks=sum(r["checks"] for r in results.values()),
        errors=0,
    )


@pytest.mark.slow
def test_threads_save_while_gc_loops(tmp_path):
    path = tmp_path / "store"
    results = stress.run_threads(path, WORKERS, SAVES, seed=7)
    agents = check_final(path, results)
    assert results["gc"] > 0
    report.record(
        "concurrency_threads",
        saves=WORKERS * SAVES,
        writers=WORKERS,
        gc_passes=results["gc"],
        agents_verified=agents,
        cross_checks=sum(results[w]["checks"] for w in range(WORKERS)),
        errors=0,
    )
