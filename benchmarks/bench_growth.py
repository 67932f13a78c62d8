"""Growth benchmark (issue 23, point 5): how the cost of one operation grows with the store and with an agent's history.

(a) The store: 1 to 2,000 agents of the Qwen2.5-0.5B shape sharing a 512-token prefix, each with a
16-token tail of its own. At each size: one more agent's save, a restore and a match of an agent's
tokens, then fsck, a gc dry run and `kvstore agents --json` (a fresh process, as a user runs it)
over the whole store. Each save and restore is timed beside the same operation in a store of 10 agents.
(b) The history: one agent talking for 512 turns of 64 tokens (synthetic KV in the Qwen2.5-0.5B
shape, the store's default 256-token chunks): each turn's save time and the blob bytes it wrote,
reported at turns 8, 32, 128, 256 and 512, each turn timed beside a short chat's turn that writes the
same bytes.

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
from benchmarks.timing import paired_ratio, summary
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
SMALL_STORE = 10  # agents in the store each size's saves and restores are timed beside
REF = 100_000  # numbers of that store's agents (names apart from the large store's)
SHORT_CHUNKS = 4  # whole chunks of the short chat each turn is timed beside (turn 8: 4 chunks and 192 tokens)


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


def _alternating(first, second, i: int) -> tuple[float, float]:
    """first() and second(), each returning its own seconds, the one that goes first alternating with i: both
    see the machine as it is at that moment."""
    if i % 2:
        b = second()
        return first(), b
    a = first()
    return a, second()


def measure_agents(root: Path, sizes: tuple[int, ...], repeat: int) -> list[dict]:
    """At each store size: `repeat` more agents' saves, restores and matches; fsck, gc dry run and the CLI once each.

    Each save and restore is timed side by side with one in a second store that stays at SMALL_STORE agents
    (each added agent is deleted again, untimed), in alternating order: store sizes are minutes apart, and on
    this virtual machine the cost of fresh memory and of a write changes by several times over minutes."""
    out = []
    cache = model_cache(SHAPE, PREFIX, seed=7)
    path = root / "agents"
    added = 0
    with kvstore.open(path) as store, kvstore.open(root / "small") as small:
        for i in range(SMALL_STORE):
            _add_agent(small, cache, REF + i)
        ref = REF + SMALL_STORE
        for n in sizes:
            while added < n:
                _add_agent(store, cache, added)
                added += 1
            saves, small_saves = [], []
            for k in range(repeat):  # each one more agent: the store grows by `repeat` per size
                a, b = _alternating(
                    lambda i=added: _add_agent(store, cache, i), lambda i=ref: _add_agent(small, cache, i), k
                )
                saves.append(a)
                small_saves.append(b)
                added += 1
                small.delete(f"agent-{ref:05d}")
                ref += 1
            asked = [list(range(PREFIX)) + _tail(i) for i in range(added - repeat, added)]
            small_asked = list(range(PREFIX)) + _tail(REF)
            # Once untimed first: the first call of each operation in the process imports its modules.
            store.restore(asked[0], model=FP), store.match(asked[0], model=FP), store.gc(dry_run=True)
            small.restore(small_asked, model=FP)
            pairs = [
                _alternating(
                    lambda t=t: _seconds(lambda: store.restore(t, model=FP)),
                    lambda s=small_asked: _seconds(lambda: small.restore(s, model=FP)),
                    k,
                )
                for k, t in enumerate(asked)
            ]
            restores, small_restores = [a for a, _ in pairs], [b for _, b in pairs]
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
                "small_save": summary(small_saves),
                "small_restore": summary(small_restores),
                "save_paired": paired_ratio(saves, small_saves),
                "restore_paired": paired_ratio(restores, small_restores),
                "fsck_s": fsck_s,
                "gc_dry_run_s": gc_s,
                "agents_json_s": cli_s,
                "load_average": _load_average(),
            }
            out.append(row)
            print(
                f"  {n:5d} agents: save {row['save']['median'] * 1e3:.1f} ms "
                f"({row['save_paired']:.2f}x a {SMALL_STORE}-agent store's), restore "
                f"{row['restore']['median'] * 1e3:.1f} ms ({row['restore_paired']:.2f}x), match "
                f"{row['match']['median'] * 1e3:.2f} ms, fsck {fsck_s:.2f} s, gc dry run {gc_s * 1e3:.0f} ms, "
                f"agents --json {cli_s * 1e3:.0f} ms",
                flush=True,
            )
    shutil.rmtree(path)
    return out


def _timed_save(store, name: str, cache: list, toks: list[int]) -> tuple[float, float, kvstore.Snapshot]:
    """The save's wall and CPU seconds (the process's, all threads), and its snapshot."""
    c0, t0 = time.process_time(), time.perf_counter()
    snap = store.save(name, cache, toks, model=FP)
    return time.perf_counter() - t0, time.process_time() - c0, snap


def _window_start(turn: int, turns: int) -> int:
    """The first of the 2 * WINDOW + 1 turns whose medians stand for `turn`: centred on it, moved inside the
    run at its ends (at the last turn, the ones up to it: the same number of pairs as any other)."""
    return max(1, min(turn - WINDOW, turns - 2 * WINDOW))


def measure_history(root: Path, turns: int) -> dict:
    """One agent, `turns` turns of PER_TURN tokens after a PROMPT-token prompt: every turn's save seconds and bytes.

    Each turn is timed side by side with a short chat's turn in the same store (alternating which goes
    first): SHORT_CHUNKS whole chunks of history, then the same number of tokens in its last chunk as the
    long chat has and the same PER_TURN new ones, so both write the same bytes; at turn 8 both are the
    same length. The ratio of the two, turn by turn, is what the history costs."""
    chunk = kvstore.DEFAULT_CHUNK_SIZE
    cache = model_cache(SHAPE, PROMPT, seed=11)
    toks = list(range(PROMPT))
    short_len = SHORT_CHUNKS * chunk
    short_cache = model_cache(SHAPE, short_len, seed=12)
    short_toks = list(range(900_000, 900_000 + short_len))
    per = []
    path = root / "history"
    with kvstore.open(path) as store:
        store.save("talker", cache, toks, model=FP)
        store.save("short", short_cache, short_toks, model=FP)
        for t in range(1, turns + 1):
            extra = len(toks) % chunk + PER_TURN  # the short chat's tokens after its whole chunks
            extend(cache, PER_TURN, seed=20_000 + t)
            toks = toks + list(range(300_000 + t * PER_TURN, 300_000 + (t + 1) * PER_TURN))
            extend(short_cache, extra, seed=40_000 + t)
            short_turn = short_toks + list(range(2_000_000 + t * 1_000, 2_000_000 + t * 1_000 + extra))
            got = {
                name: _timed_save(store, name, c, tk)
                for name, c, tk in (("talker", cache, toks), ("short", short_cache, short_turn))[:: 1 if t % 2 else -1]
            }
            for c in short_cache:
                c.trim(extra)
            wall, cpu, snap = got["talker"]
            s_wall, s_cpu, s_snap = got["short"]
            per.append(
                {
                    "turn": t,
                    "tokens": len(toks),
                    "s": wall,
                    "cpu_s": cpu,
                    "bytes": snap.bytes_written,
                    "short_tokens": len(short_turn),
                    "short_s": s_wall,
                    "short_cpu_s": s_cpu,
                    "short_bytes": s_snap.bytes_written,
                }
            )
    shutil.rmtree(path)
    reported = []
    for t in REPORTED_TURNS:
        if t > turns:
            continue
        near = per[_window_start(t, len(per)) - 1 :][: 2 * WINDOW + 1]
        reported.append(
            {
                "turn": t,
                "tokens": per[t - 1]["tokens"],
                "median_s": statistics.median(p["s"] for p in near),
                "median_cpu_s": statistics.median(p["cpu_s"] for p in near),
                "turns_in_median": len(near),
                "bytes": per[t - 1]["bytes"],
                "median_bytes": statistics.median(p["bytes"] for p in near),
                "short_median_s": statistics.median(p["short_s"] for p in near),
                "short_median_cpu_s": statistics.median(p["short_cpu_s"] for p in near),
                "short_median_bytes": statistics.median(p["short_bytes"] for p in near),
                "paired": paired_ratio([p["s"] for p in near], [p["short_s"] for p in near]),
                "paired_cpu": paired_ratio([p["cpu_s"] for p in near], [p["short_cpu_s"] for p in near]),
            }
        )
    return {
        "per_turn_tokens": PER_TURN,
        "prompt_tokens": PROMPT,
        "chunk_size": chunk,
        "short_chunks": SHORT_CHUNKS,
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
    if "short_s" in h[0]:
        ms = [p["short_s"] * 1e3 for p in h]
        smooth = [statistics.median(ms[max(0, i - WINDOW) : i + WINDOW + 1]) for i in range(len(ms))]
        ax2.plot(turns, smooth, linewidth=1.2, color="tab:green", label="a short chat's turn, timed beside it")
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
                    f"(CPU {row['median_cpu_s'] * 1e3:.1f} ms), {row['paired']:.2f}x a short chat's "
                    f"(CPU {row['paired_cpu']:.2f}x), {row['bytes'] / 2**20:.2f} MiB"
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
        "small_store": SMALL_STORE,
        "agents": agents,
        "history": history,
    }
    results["summary"] = limits_summary(results)
    image = plot(results, args.quick)
    print(f"wrote {image.relative_to(report.ROOT)}")
    report.publish(NAME, results, section(results), quick=args.quick)


def limits_summary(r: dict) -> dict:
    """The issue's limits: a turn's save late in a chat, and one more agent's save and restore in a large store,
    each against the same operation on a short history or a small store timed beside it."""
    rep = r["history"]["reported"]
    large = r["agents"][-1]
    small = r.get("small_store", SMALL_STORE)
    rows = {
        f"save at turn {rep[-1]['turn']} / a short chat's, side by side": rep[-1]["paired"],
        f"save CPU at turn {rep[-1]['turn']} / a short chat's, side by side": rep[-1]["paired_cpu"],
        f"save at {large['agents']} agents / in a {small}-agent store, side by side": large["save_paired"],
        f"restore at {large['agents']} agents / in a {small}-agent store, side by side": large["restore_paired"],
    }
    return {k: {"value": round(v, 2), "must": LIMIT, "met": v <= LIMIT} for k, v in rows.items()}


def apart(r: dict) -> dict:
    """The same comparisons between measurements minutes apart (turn 512 against turn 8, 2,000 agents against 10)."""
    rep = r["history"]["reported"]
    agents = {row["agents"]: row for row in r["agents"]}
    small, large = agents.get(10) or r["agents"][0], r["agents"][-1]
    return {
        "turn": round(rep[-1]["median_s"] / rep[0]["median_s"], 2),
        "turn_cpu": round(rep[-1]["median_cpu_s"] / rep[0]["median_cpu_s"], 2),
        "save": round(large["save"]["median"] / small["save"]["median"], 2),
        "restore": round(large["restore"]["median"] / small["restore"]["median"], 2),
    }


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    la = r["load_average"]
    out = [
        "### Growth: one operation's cost against the store's size and an agent's history (`bench_growth.py`)\n",
        f"_{machine_line(r['machine'])}; synthetic bf16 KV in the {r['shape']} shape; a shared machine, 1-minute "
        f"load average {la[0]} at the start and {la[1]} at the end; measured in {r['seconds']:.0f} s._\n",
        f"**(a) The store.** Agents share a {r['prefix_tokens']}-token prefix and each has a {r['tail_tokens']}-token "
        "tail of its own. At each size, one more agent is saved, then restored and matched (medians of "
        f"{r['agents'][0]['save']['runs']}, in ms); each save and restore is timed beside the same operation in a "
        f"second store that stays at {r.get('small_store', SMALL_STORE)} agents, in alternating order, and *ratio* "
        "is the median of those pairs' ratios. fsck, a gc dry run and `kvstore agents --json` (a fresh process) "
        "run once over the whole store.\n",
        "| agents | save | ratio | restore | ratio | match | fsck | gc dry run | agents --json | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["agents"]:
        out.append(
            f"| {row['agents']:,} | {report.fmt_ms(row['save']['median'])} | {row['save_paired']:.2f} | "
            f"{report.fmt_ms(row['restore']['median'])} | {row['restore_paired']:.2f}"
            f" | {row['match']['median'] * 1e3:.2f} | {report.fmt_ms(row['fsck_s'])} | "
            f"{report.fmt_ms(row['gc_dry_run_s'])} | {report.fmt_ms(row['agents_json_s'])} | {row['load_average']} |"
        )
    h = r["history"]
    out += [
        "",
        f"**(b) The history.** One agent: a {h['prompt_tokens']}-token prompt, then turns of {h['per_turn_tokens']} "
        f"tokens, chunks of {h['chunk_size']} tokens. Save time is the median of the {2 * WINDOW + 1} turns around the one "
        "named (at the last turn, the ones up to it), wall clock and CPU time of the process (all its threads); bytes are the blob bytes that turn's "
        "save wrote (a turn writes its last, partial chunk again, so the bytes cycle with the chunk: the median is "
        "over the same turns). Each turn is timed beside a short chat's turn in the same store, in alternating "
        f"order: {h['short_chunks']} whole chunks of history, then as many tokens in its last chunk as the long "
        "chat and the same new ones, so both write the same bytes (at turn 8 both are the same length); *ratio* "
        "is the median of the pairs' ratios, wall clock and CPU.\n",
        "| turn | tokens | save (ms) | save CPU (ms) | short chat's save (ms) | ratio | CPU ratio | "
        "bytes written (MiB) | median bytes (MiB) | short chat's median bytes (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in h["reported"]:
        out.append(
            f"| {row['turn']} | {row['tokens']:,} | {report.fmt_ms(row['median_s'])} | "
            f"{report.fmt_ms(row['median_cpu_s'])} | {report.fmt_ms(row['short_median_s'])} | {row['paired']:.2f} | "
            f"{row['paired_cpu']:.2f} | {row['bytes'] / 2**20:.2f} | {row['median_bytes'] / 2**20:.2f} | "
            f"{row['short_median_bytes'] / 2**20:.2f} |"
        )
    out += ["", "| limit (issue 23) | measured | must | |", "|---|---:|---:|---|"]
    for name, row in r["summary"].items():
        out.append(f"| {name} | {row['value']} | ≤ {row['must']} | {'met' if row['met'] else '**not met**'} |")
    far = apart(r)
    rep = h["reported"]
    out += [
        "",
        f"The same comparisons between measurements minutes apart: a save at turn {rep[-1]['turn']} took "
        f"{far['turn']}x the one at turn {rep[0]['turn']} (CPU {far['turn_cpu']}x); at {r['agents'][-1]['agents']:,} "
        f"agents a save took {far['save']}x and a restore {far['restore']}x what they took at 10. On this virtual "
        "machine the cost of the same work changes several times over minutes (a plain loop writing 2.25 MiB "
        "files took 4.1 ms a write in one run and 0.43 ms in the next), which is why the limits are read side "
        "by side.",
        "",
        "![Growth](images/growth.png)\n",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
