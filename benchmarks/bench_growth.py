"""Growth benchmark (issue 23, point 5): how the cost of one operation grows with the store and with an agent's history.

(a) The store: 1 to 2,000 agents of the Qwen2.5-0.5B shape sharing a 512-token prefix, each with a
16-token tail of its own. At each size: one more agent's save, a restore and a match of an agent's
tokens, then fsck, a gc dry run and `kvstore agents --json` (a fresh process, as a user runs it)
over the whole store.
(b) The history: one agent talking for 512 turns of 64 tokens (synthetic KV in the Qwen2.5-0.5B
shape, the store's default 256-token chunks): each turn's save time and the blob bytes it wrote,
reported at turns 8, 32, 128, 256 and 512.

Writes benchmarks/results/growth.json, its section of docs/BENCHMARKS.md and docs/images/growth.png
(a --quick run: benchmarks/quick/ instead).

    python -m benchmarks.bench_growth [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvstore
from benchmarks import report
from benchmarks.common import machine, machine_line
from benchmarks.timing import summary
from kvstore.testing import extend, model_cache

NAME = "growth"
FP = "9a" * 16
SHAPE = "qwen2.5-0.5b"
PREFIX, TAIL = 512, 16  # tokens every agent shares, and its own
AGENTS, AGENTS_QUICK = (1, 10, 100, 500, 2000), (1, 10, 50)
TURNS, TURNS_QUICK, PER_TURN, PROMPT = 512, 64, 64, 704
REPORTED_TURNS = (8, 32, 128, 256, 512)
WINDOW = 5  # turns on each side of a reported turn whose save times give its median
LIMIT = 1.2  # the "the same, within 1.2x"


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _tail(i: int) -> list[int]:
    return [500_000 + i * TAIL + j for j in range(TAIL)]


def _add_agent(store, cache, i: int) -> float:
    """Save agent i (the shared prefix, then its own tail of fresh KV); the save's seconds."""
    extend(cache, TAIL, seed=1000 + i)
    t = _seconds(lambda: store.save(f"agent-{i:05d}", cache, list(range(PREFIX)) + _tail(i), model=FP))
    for c in cache:
        c.trim(TAIL)
    return t


def measure_agents(root: Path, sizes: tuple[int, ...], repeat: int) -> list[dict]:
    """At each store size: `repeat` more agents' saves, restores and matches; fsck, gc dry run and the CLI once each."""
    out = []
    cache = model_cache(SHAPE, PREFIX, seed=7)
    path = root / "agents"
    added = 0
    with kvstore.open(path) as store:
        for n in sizes:
            while added < n:
                _add_agent(store, cache, added)
                added += 1
            saves = []
            for _ in range(repeat):  # each one more agent: the store grows by `repeat` per size
                saves.append(_add_agent(store, cache, added))
                added += 1
            asked = [list(range(PREFIX)) + _tail(i) for i in range(added - repeat, added)]
            # Once untimed first: the first call of each operation in the process imports its modules.
            store.restore(asked[0], model=FP), store.match(asked[0], model=FP), store.gc(dry_run=True)
            restores = [_seconds(lambda t=t: store.restore(t, model=FP)) for t in asked]
            matches = [_seconds(lambda t=t: store.match(t, model=FP)) for t in asked]
            fsck_s = _seconds(lambda: store.fsck())
            gc_s = _seconds(lambda: store.gc(dry_run=True))
            cli = [sys.executable, "-m", "kvstore", "--store", str(path), "agents", "--json"]
            t0 = time.perf_counter()
            subprocess.run(cli, check=True, capture_output=True, cwd=report.ROOT)
            cli_s = time.perf_counter() - t0
            row = {
                "agents": n,
                "agents_after": added,
                "save": summary(saves),
                "restore": summary(restores),
                "match": summary(matches),
                "fsck_s": fsck_s,
                "gc_dry_run_s": gc_s,
                "agents_json_s": cli_s,
                "load_average": _load_average(),
            }
            out.append(row)
            print(
                f"  {n:5d} agents: save {row['save']['median'] * 1e3:.1f} ms, restore "
                f"{row['restore']['median'] * 1e3:.1f} ms, match {row['match']['median'] * 1e3:.2f} ms, fsck "
                f"{fsck_s:.2f} s, gc dry run {gc_s * 1e3:.0f} ms, agents --json {cli_s * 1e3:.0f} ms",
                flush=True,
            )
    shutil.rmtree(path)
    return out


def measure_history(root: Path, turns: int) -> dict:
    """One agent, `turns` turns of PER_TURN tokens after a PROMPT-token prompt: every turn's save seconds and bytes."""
    cache = model_cache(SHAPE, PROMPT, seed=11)
    toks = list(range(PROMPT))
    per = []
    path = root / "history"
    with kvstore.open(path) as store:
        store.save("talker", cache, toks, model=FP)
        for t in range(1, turns + 1):
            extend(cache, PER_TURN, seed=20_000 + t)
            toks = toks + list(range(300_000 + t * PER_TURN, 300_000 + (t + 1) * PER_TURN))
            c0, t0 = time.process_time(), time.perf_counter()
            snap = store.save("talker", cache, toks, model=FP)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            per.append({"turn": t, "tokens": len(toks), "s": wall, "cpu_s": cpu, "bytes": snap.bytes_written})
    shutil.rmtree(path)
    reported = []
    for t in REPORTED_TURNS:
        if t > turns:
            continue
        near = [p for p in per if abs(p["turn"] - t) <= WINDOW]
        reported.append(
            {
                "turn": t,
                "tokens": per[t - 1]["tokens"],
                "median_s": statistics.median(p["s"] for p in near),
                "median_cpu_s": statistics.median(p["cpu_s"] for p in near),
                "turns_in_median": len(near),
                "bytes": per[t - 1]["bytes"],
                "median_bytes": statistics.median(p["bytes"] for p in near),
            }
        )
    return {
        "per_turn_tokens": PER_TURN,
        "prompt_tokens": PROMPT,
        "chunk_size": kvstore.DEFAULT_CHUNK_SIZE,
        "turns": per,
        "reported": reported,
    }


def plot(r: dict, quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = [row["agents"] for row in r["agents"]]
    for key, label in (("save", "one more agent's save"), ("restore", "restore"), ("match", "match")):
        ax1.plot(xs, [row[key]["median"] * 1e3 for row in r["agents"]], marker="o", label=label)
    for key, label in (("fsck_s", "fsck"), ("gc_dry_run_s", "gc dry run"), ("agents_json_s", "agents --json")):
        ax1.plot(xs, [row[key] * 1e3 for row in r["agents"]], marker="s", linestyle="--", label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(f"agents in the store (sharing a {r['prefix_tokens']}-token prefix)")
    ax1.set_ylabel("ms")
    ax1.set_title("(a) cost against the store's size")
    ax1.legend(fontsize=8)
    h = r["history"]["turns"]
    turns = [p["turn"] for p in h]
    for key, label, color in (("s", "wall clock", "tab:blue"), ("cpu_s", "CPU (all threads)", "tab:orange")):
        ms = [p[key] * 1e3 for p in h]
        ax2.plot(turns, ms, linewidth=0.5, alpha=0.35, color=color)
        smooth = [statistics.median(ms[max(0, i - WINDOW) : i + WINDOW + 1]) for i in range(len(ms))]
        ax2.plot(turns, smooth, linewidth=1.8, color=color, label=f"{label}, median of {2 * WINDOW + 1} turns")
    ax2.set_xlabel(f"turn ({r['history']['per_turn_tokens']} tokens each)")
    ax2.set_ylabel("ms per save")
    ax2.set_ylim(bottom=0, top=max(statistics.quantiles([p["s"] * 1e3 for p in h], n=20)[-1] * 1.5, 1))
    ax2.set_title("(b) one agent's save, turn after turn")
    ax2.legend(fontsize=8)
    ax3.plot(turns, [p["bytes"] / 2**20 for p in h], linewidth=0.7, color="tab:gray")
    ax3.set_xlabel("turn")
    ax3.set_ylabel("MiB of blobs written")
    ax3.set_ylim(bottom=0)
    ax3.set_title("(c) bytes a turn's save writes")
    fig.tight_layout()
    out = report.images_dir(quick) / "growth.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{AGENTS_QUICK} agents and {TURNS_QUICK} turns")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir under benchmarks/)")
    ap.add_argument("--repeat", type=int, default=11, help="agents added, restored and matched per store size")
    ap.add_argument("--only", choices=("agents", "history"), help="measure one part and print it (publishes nothing)")
    ap.add_argument("--plot", action="store_true", help="redraw the plot from the published results, measuring nothing")
    args = ap.parse_args()
    if args.plot:
        print(f"wrote {plot(report.load(NAME), quick=False).relative_to(report.ROOT)}")
        return
    root = Path(tempfile.mkdtemp(prefix="kvgrowth-", dir=args.dir or report.ROOT / "benchmarks"))
    t_start, load_start = time.perf_counter(), _load_average()
    try:
        history = None if args.only == "agents" else measure_history(root, TURNS_QUICK if args.quick else TURNS)
        if history:
            for row in history["reported"]:
                print(
                    f"  turn {row['turn']:4d} ({row['tokens']:,} tokens): {row['median_s'] * 1e3:.1f} ms "
                    f"(CPU {row['median_cpu_s'] * 1e3:.1f} ms), "
                    f"{row['bytes'] / 2**20:.2f} MiB"
                )
        agents = (
            None
            if args.only == "history"
            else measure_agents(root, AGENTS_QUICK if args.quick else AGENTS, args.repeat)
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.only:
        return
    results = {
        "machine": machine(),
        "quick": args.quick,
        "shape": SHAPE,
        "seconds": round(time.perf_counter() - t_start, 1),
        "load_average": [load_start, _load_average()],
        "prefix_tokens": PREFIX,
        "tail_tokens": TAIL,
        "agents": agents,
        "history": history,
    }
    results["summary"] = limits_summary(results)
    image = plot(results, args.quick)
    print(f"wrote {image.relative_to(report.ROOT)}")
    report.publish(NAME, results, section(results), quick=args.quick)


def limits_summary(r: dict) -> dict:
    """The issue's limits: a turn's save and one more agent's save and restore, each against its small-store value."""
    rep = r["history"]["reported"]
    agents = {row["agents"]: row for row in r["agents"]}
    small = agents.get(10) or r["agents"][0]
    large = r["agents"][-1]
    rows = {
        f"save at turn {rep[-1]['turn']} / turn {rep[0]['turn']}": rep[-1]["median_s"] / rep[0]["median_s"],
        f"save CPU at turn {rep[-1]['turn']} / turn {rep[0]['turn']}": rep[-1]["median_cpu_s"] / rep[0]["median_cpu_s"],
        f"save at {large['agents']} agents / {small['agents']}": large["save"]["median"] / small["save"]["median"],
        f"restore at {large['agents']} agents / {small['agents']}": large["restore"]["median"]
        / small["restore"]["median"],
    }
    return {k: {"value": round(v, 2), "must": LIMIT, "met": v <= LIMIT} for k, v in rows.items()}


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    la = r["load_average"]
    out = [
        "### Growth: one operation's cost against the store's size and an agent's history (`bench_growth.py`)\n",
        f"_{machine_line(r['machine'])}; synthetic bf16 KV in the {r['shape']} shape; a shared machine, 1-minute "
        f"load average {la[0]} at the start and {la[1]} at the end; measured in {r['seconds']:.0f} s._\n",
        f"**(a) The store.** Agents share a {r['prefix_tokens']}-token prefix and each has a {r['tail_tokens']}-token "
        "tail of its own. At each size, one more agent is saved, then restored and matched (medians of "
        f"{r['agents'][0]['save']['runs']}, in ms); fsck, a gc dry run and `kvstore agents --json` (a fresh process) "
        "run once over the whole store.\n",
        "| agents | save | restore | match | fsck | gc dry run | agents --json | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["agents"]:
        out.append(
            f"| {row['agents']:,} | {report.fmt_ms(row['save']['median'])} | {report.fmt_ms(row['restore']['median'])}"
            f" | {row['match']['median'] * 1e3:.2f} | {report.fmt_ms(row['fsck_s'])} | "
            f"{report.fmt_ms(row['gc_dry_run_s'])} | {report.fmt_ms(row['agents_json_s'])} | {row['load_average']} |"
        )
    h = r["history"]
    out += [
        "",
        f"**(b) The history.** One agent: a {h['prompt_tokens']}-token prompt, then turns of {h['per_turn_tokens']} "
        f"tokens, chunks of {h['chunk_size']} tokens. Save time is the median of the turns within {WINDOW} of the one "
        "named, wall clock and CPU time of the process (all its threads: less sensitive to the machine's other "
        "load); bytes are the blob bytes that turn's save wrote (a turn writes its last, partial chunk again, "
        "so the bytes cycle with the chunk: the median is over the same turns).\n",
        "| turn | tokens | save (ms) | save CPU (ms) | bytes written (MiB) | median bytes (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in h["reported"]:
        out.append(
            f"| {row['turn']} | {row['tokens']:,} | {report.fmt_ms(row['median_s'])} | "
            f"{report.fmt_ms(row['median_cpu_s'])} | {row['bytes'] / 2**20:.2f} | "
            f"{row['median_bytes'] / 2**20:.2f} |"
        )
    out += ["", "| limit (issue 23) | measured | must | |", "|---|---:|---:|---|"]
    for name, row in r["summary"].items():
        out.append(f"| {name} | {row['value']} | ≤ {row['must']} | {'met' if row['met'] else '**not met**'} |")
    out += ["", "![Growth](images/growth.png)\n"]
    return "\n".join(out)


if __name__ == "__main__":
    main()
