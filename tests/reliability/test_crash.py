"""Crash injection: SIGKILL a worker at random moments and at injected points inside blob writes and
index transactions, then check that every committed snapshot restores bit-exact and that, after
gc(grace=0), fsck is clean and no temp file remains (see oracle.check_store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import kvstore
from kvstore import _crash

from . import oracle, report, synth


@pytest.mark.slow
def test_kills_lose_nothing(tmp_path, kills):
    stats = oracle.campaign(tmp_path, kills, seed=20261123)
    assert stats["kills"] == kills
    injected = sum(v for k, v in stats.items() if k.startswith("killed_at_"))
    # Both kinds of death happened, and kills landed inside blob writes and index transactions.
    assert stats["killed_by_timer"] > 0 and injected > 0
    assert stats["killed_at_blob.before_rename"] + stats["killed_at_blob.after_rename"] > 0
    assert stats["killed_at_txn.before_commit"] + stats["killed_at_txn.after_commit"] > 0
    report.record("crash", **{k: v for k, v in sorted(stats.items())})


def test_crash_point_is_a_no_op_unless_armed(tmp_path):
    _crash.arm(None)
    assert _crash._armed == {}
    _crash.crash_point("txn.before_commit")  # would kill this test process if armed
    _crash.arm("blob.before_rename@3, txn.after_commit")
    assert _crash._armed == {"blob.before_rename": 3, "txn.after_commit": 1}
    _crash.arm("")
    assert _crash._armed == {}


@pytest.mark.parametrize("point", ["blob.before_rename", "blob.after_rename", "txn.before_commit", "txn.after_commit"])
def test_env_var_kills_at_the_named_point(tmp_path, point):
    """KVSTORE_CRASH_AT in a fresh process: the save dies there, and what it leaves is consistent."""
    code = (
        "import sys, kvstore\n"
        "from reliability import synth\n"
        "s = kvstore.open(sys.argv[1], chunk_size=synth.CHUNK, io_threads=1)\n"
        "t = synth.PREFIXES[0]\n"
        "s.save('a', synth.make_cache(t), t, model=synth.FP)\n"
        "print('survived')\n"
    )
    kvstore.open(tmp_path / "s", chunk_size=synth.CHUNK).close()  # created here: the save's is the first commit
    env = dict(
        os.environ,
        KVSTORE_CRASH_AT=point,
        PYTHONPATH=os.pathsep.join(filter(None, [str(oracle.TESTS_DIR), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout
    with kvstore.open(tmp_path / "s") as store:
        names = [a.name for a in store.agents()]
        assert names == (["a"] if point == "txn.after_commit" else [])
        if names:
            cache, tokens = store.load("a", model=synth.FP)
            assert synth.checksum(cache) == synth.expected_sum(tokens)
        temps, files = list(store.blobs.iter_temp()), list(store.blobs.iter_files())
        # Dead before the rename: a temp file; after it: blob files no row names yet (until gc).
        assert (len(temps), len(files) > 0) == ((1, False) if point == "blob.before_rename" else (0, True))
        store.gc(grace=0)
        assert store.fsck(grace=0).problems == ()
        assert list(store.blobs.iter_temp()) == []
