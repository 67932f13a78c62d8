"""Crash points for the reliability suite: no-ops unless armed (KVSTORE_CRASH_AT or `arm`).

`KVSTORE_CRASH_AT="blob.before_rename@3"` makes the process SIGKILL itself at the third time it
reaches that point, so tests can die exactly inside a blob write or an index transaction.
Points: blob.before_rename, blob.after_rename, txn.before_commit, txn.after_commit,
gc.after_rows, gc.file_removed.
"""

from __future__ import annotations

import os
import signal

_armed: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Die at the n-th hit of each named point: "name[@n][,name[@n]...]"; None or "" disarms."""
    _armed.clear()
    for part in (spec or "").split(","):
        name, _, n = part.strip().partition("@")
        if name:
            _armed[name] = int(n or 1)


def crash_point(name: str) -> None:
    """SIGKILL this process here if `name` is armed and its count has run out."""
    if _armed and name in _armed:
        _armed[name] -= 1
        if _armed[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("KVSTORE_CRASH_AT"))
