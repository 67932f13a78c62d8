"""Faults found by the independent checks of issue 15 (items 10, 11, 13): racing store creation,
index damage that fsck must report rather than crash on, and blob paths that are not regular files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import kvstore

from . import report, synth
from .damage import check_restores, populate

RACE_TRIALS, RACERS = 10, 4

_RACER = textwrap.dedent("""
    import json, sys, time
    import kvstore, kvstore.store
    root, trials, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())  # the same start time for every racer
    out = []
    for k in range(trials):
        time.sleep(max(0.0, t0 + k * step - time.time()))
        try:
            with kvstore.open(f"{root}/s{k}", chunk_size=16) as store:
                out.append(["ok", store.chunk_size])
        except Exception as e:
            out.append([type(e).__name__, str(e)])
    print(json.dumps(out))
""")


def test_processes_creating_one_store_at_once(tmp_path):
    """Item 10: 4 processes open the same new store at the same moment, 10 times; every open succeeds."""
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(RACE_TRIALS), "0.3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(RACERS)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * RACERS  # every racer has imported kvstore
    t0 = time.time() + 0.5
    for p in procs:
        p.stdin.write(f"{t0}\n")
        p.stdin.close()
    results = [json.loads(p.stdout.read()) for p in procs]
    assert [p.wait(timeout=60) for p in procs] == [0] * RACERS
    outcomes = [r for res in results for r in res]
    assert len(outcomes) == RACE_TRIALS * RACERS
    assert [o for o in outcomes if o[0] != "ok"] == []
    assert {o[1] for o in outcomes} == {16}
    for k in range(RACE_TRIALS):
        with kvstore.open(tmp_path / f"s{k}") as store:
            assert store.chunk_size == 16 and store.fsck().ok
    report.record("faults", racing_creates=len(outcomes), racing_creates_failed=0)
