"""Hand-planted mutants of the engine, each run against the fast engine tests (issue 15).

Each mutant is a realistic bug in save, restore, gc, fsck or the chunk keys. The script copies the
repository's `kvstore/` and `tests/` to a scratch folder per mutant, applies the mutant there and runs
FAST_TESTS with that copy first on the import path; a mutant is killed when the tests fail.
Not part of CI (a full pass takes 10-40 minutes); run it after changing the engine or the tests:

    python tests/mutation/run_mutants.py [NAME ...]     # prints a table; exit 1 if a mutant survives
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST_TESTS = [
    "tests/test_contracts.py",
    "tests/test_roundtrip.py",
    "tests/test_dedup.py",
    "tests/test_fsck_gc.py",
    "tests/test_read_path.py",
    "tests/test_write_protocol.py",
    "tests/test_sliding_window.py",
]

_REUSE = '''

_POOL: dict = {}


def _reuse(arrays):
    """MUTANT: restored arrays of a shape seen before are written into the earlier restore's arrays."""
    for s, named in arrays.items():
        for name, a in list(named.items()):
            old = _POOL.get((s, name, tuple(a.shape), a.dtype))
            if old is None:
                _POOL[(s, name, tuple(a.shape), a.dtype)] = a
            else:
                old[...] = a
                named[name] = old
    return arrays
'''

# name -> (what the bug is, [(file, old text, new text), ...])
MUTANTS = {
    "key_ignores_last_token": (
        "a chunk key hashes all but the chunk's last token",
        [
            (
                "kvstore/cache/keys.py",
                "prev = digest(prev + data[start : start + step])",
                "prev = digest(prev + data[start : start + step - 4])",
            )
        ],
    ),
    "tokens_in_16_bits": (
        "token ids are kept in 16 bits",
        [
            (
                "kvstore/cache/keys.py",
                'return np.ascontiguousarray(arr, dtype="<u4")',
                'return np.ascontiguousarray(arr.astype("<u2"), dtype="<u4")',
            )
        ],
    ),
    "gc_drops_labelled": (
        "gc's retention forgets labelled snapshots",
        [
            (
                "kvstore/index/garbage.py",
                "s.c.pinned == False,  # noqa: E712\n            s.c.label.is_(None),\n",
                "s.c.pinned == False,  # noqa: E712\n",
            )
        ],
    ),
    "gc_drops_pinned": (
        "gc's retention forgets pinned snapshots",
        [("kvstore/index/garbage.py", "s.c.pinned == False,  # noqa: E712", "True,  # noqa: E712")],
    ),
    "gc_ignores_grace": (
        "gc sweeps unnamed blob files whatever their age",
        [("kvstore/ops/gc.py", "if b in unreferenced or blobs.age(p, now) > grace]", "if True]")],
    ),
    "restores_share_memory": (
        "a restore writes into an earlier restore's arrays of the same shapes",
        [
            ("kvstore/ops/restore.py", "    arrays = rd.run()\n", "    arrays = _reuse(rd.run())\n"),
            ("kvstore/ops/restore.py", "def head(", _REUSE.lstrip("\n") + "\n\ndef head("),
        ],
    ),
    "plan_ignores_first": (
        "restore accepts a stored piece that starts after the positions it needs",
        [("kvstore/ops/plan.py", "if hit is None or start + hit[1] > max(need_from, start):", "if hit is None:")],
    ),
    "load_trusts_chunk_list": (
        "load does not check that the token ids re-derive the snapshot's chunks",
        [("kvstore/ops/restore.py", "    if stored != keys:", "    if False:")],
    ),
    "match_trusts_hashes": (
        "restore trusts a hash match without comparing the stored token ids",
        [("kvstore/ops/plan.py", "    if stored.size == n and (stored == mine).all():", "    if True:")],
    ),
    "window_off_by_one": (
        "a sliding layer's window starts one position late",
        [
            (
                "kvstore/cache/codec.py",
                'return max(0, n_tokens - slot.param("max_size"))',
                'return max(0, n_tokens - slot.param("max_size") + 1)',
            )
        ],
    ),
    "save_skips_fuller_piece": (
        "save keeps a stored piece that lacks the chunk's first position",
        [
            (
                "kvstore/ops/pieces.py",
                "if have.get((keys[i], s), length + 1) > first:",
                "if have.get((keys[i], s), length + 1) > first + 1:",
            )
        ],
    ),
    "fsck_checks_sizes_only": (
        "fsck checks each blob's size, not its hash",
        [("kvstore/ops/fsck.py", "if not store.blobs.hashes_to_name(blob_id, buf):", "if False:")],
    ),
    "repair_keeps_layer_rows": (
        "fsck --repair drops a bad blob's row but not the layers naming it",
        [("kvstore/index/queries.py", "        conn.execute(delete(_cl).where(_cl.c.blob_id.in_(part)))\n", "")],
    ),
    "save_skips_recheck": (
        "a commit (save, import) does not re-check under the write lock that reused chunks still exist",
        [("kvstore/index/commit.py", "if reused and not queries.layers_present(conn, reused):", "if False:")],
    ),
}


def run(name: str) -> tuple[str, str, float]:
    """(outcome, first failing test, seconds) of one mutant."""
    _what, edits = MUTANTS[name]
    # On a RAM disk where there is one: the tests' fsyncs then cost nothing, and mutants run 5-10x faster.
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-", dir=scratch) as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "kvstore", work / "kvstore")
        shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")  # pytest settings
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
        for rel, old, new in edits:
            path = work / rel
            text = path.read_text()
            if text.count(old) != 1:
                return "not applied", f"{rel}: the text to mutate is not there once", 0.0
            path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
        t0 = time.perf_counter()
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "-W",
                "ignore",
                f"--basetemp={work / 'pytest'}",
                *FAST_TESTS,
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        failed = next((ln.split(" ")[1] for ln in got.stdout.splitlines() if ln.startswith("FAILED ")), "")
        if got.returncode == 0:
            return "SURVIVED", "", seconds
        return "killed", failed or got.stdout.strip().splitlines()[-1], seconds


def main(names: list[str]) -> int:
    names = names or list(MUTANTS)
    survived = 0
    print("| mutant | bug | outcome | killed by | s |\n|---|---|---|---|---|", flush=True)
    for name in names:
        outcome, by, seconds = run(name)
        survived += outcome != "killed"
        print(f"| {name} | {MUTANTS[name][0]} | {outcome} | {by} | {seconds:.0f} |", flush=True)
    print(f"\n{len(names) - survived} of {len(names)} mutants killed by the fast engine tests")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
