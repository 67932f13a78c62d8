"""The command's start-up (issue 17): fresh processes of `import kvstore`, `--help`, `--version` and the read
commands on a small folder store, against `python -c pass`. Run by `python -m benchmarks.bench_cli`
(`--startup-only` for this table alone).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

import kvstore
from benchmarks import report
from benchmarks.common import machine, machine_line

LIMIT_S = 0.3  # issue 17: every command starts in under 0.3 s on this machine
CHUNK = 256


def _wall(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return dt


def bench_startup(root: Path, rounds: int = 10) -> dict:
    """Wall time of fresh processes: the interpreter alone, `import kvstore`, `--help`, `--version` and the
    read commands.

    The commands are the installed console script; the read commands read a folder store of two agents.
    Each is run `rounds` times, interleaved, after one unmeasured warm-up round (the page cache).
    """
    with kvstore.open(root, chunk_size=CHUNK) as store:
        for name, seed in (("tech", 1), ("biz", 2)):
            cache = [KVCache() for _ in range(2)]
            for c in cache:
                c.update_and_fetch(mx.ones((1, 2, 300, 8)), mx.ones((1, 2, 300, 8)))
            store.save(name, cache, list(range(seed, seed + 300)), model="ab" * 16)
    script = str(Path(sys.executable).parent / "kvstore")
    env = {**os.environ, "KVSTORE_HOME": str(root)}
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import kvstore'": [sys.executable, "-c", "import kvstore"],
        "kvstore --help": [script, "--help"],
        "kvstore --version": [script, "--version"],
        "kvstore info": [script, "info"],
        "kvstore agents": [script, "agents"],
        "kvstore show tech": [script, "show", "tech"],
        "kvstore models": [script, "models"],
        "kvstore du": [script, "du"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds + 1):
        for name, argv in cases.items():
            dt = _wall(argv, env)
            if r:
                times[name].append(dt)
    base = statistics.median(times["python -c pass"])
    return {
        name: {
            "median_s": round(statistics.median(t), 3),
            "min_s": round(min(t), 3),
            "over_python_s": round(statistics.median(t) - base, 3),
            "rounds": rounds,
        }
        for name, t in times.items()
    }


def startup_machine() -> dict:
    """machine(), and the load average the start-up figures were taken at (the machine is shared)."""
    return {**machine(), "load": [round(x, 1) for x in os.getloadavg()]}


def print_startup(rows: dict) -> None:
    print(f"\nstart-up, fresh processes (median of {next(iter(rows.values()))['rounds']}; target < {LIMIT_S} s):")
    print(f"{'command':30} {'median s':>9} {'min s':>7} {'- python':>9}")
    for name, r in rows.items():
        verdict = "" if name.startswith("python -c pass") else ("ok" if r["median_s"] < LIMIT_S else "MISSED")
        print(f"{name:30} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['over_python_s']:9.3f}  {verdict}")


def startup_section(rows: dict, m: dict, limit: float) -> list[str]:
    """The start-up table: each command as a fresh process, against the interpreter alone."""
    load = f"; load average {', '.join(str(x) for x in m['load'])}" if m.get("load") else ""
    out = [
        "#### Start-up (issue 17)\n",
        f"_{machine_line(m)}{load}; each a fresh process on a folder store of two agents, median of "
        f"{next(iter(rows.values()))['rounds']} runs (min) after one warm-up round._\n",
        "| command | median | min | over `python -c pass` | limit | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, x in rows.items():
        if name.startswith("python -c pass"):
            out.append(f"| `{name}` | {x['median_s']:.3f} s | {x['min_s']:.3f} s | | | |")
            continue
        out.append(
            f"| `{name}` | {x['median_s']:.3f} s | {x['min_s']:.3f} s | {x['over_python_s']:+.3f} s | "
            f"< {limit:g} s | {report.verdict(x['median_s'], limit)} |"
        )
    return out + [""]
