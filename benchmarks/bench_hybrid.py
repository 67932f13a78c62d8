"""Hybrid models (issue 24 point 8): warm start and resume against cold, and what a state checkpoint costs.

On a built-in hybrid model (default `qwen3_next` base: gated delta-net layers with an attention layer
every 4th) and, as the reference row, the built-in llama of the same size, random weights (speed does
not depend on them), chunk size 256, a ~1,100-token system prompt (4 chunks):
- warm start: agent A's first turn is stored; a new agent with the same system prompt and its own role
  asks a question in a new manager. Its time to first token against a cold start of the same prompt (a
  manager on an empty store), and the tokens restored and prefilled;
- resume: A's next turn in a new process (model loaded, nothing of the agent in memory), against a cold
  prefill of the same rendered prompt in a new process too; each child times its own turn only;
- checkpoint bytes: the files of the store after A's first turn, from its index: the bytes of each
  recurrent-state checkpoint (one blob per `ArraysCache` slot) against the KV bytes of a whole chunk.
Writes benchmarks/results/hybrid.json and its block of docs/BENCHMARKS.md (a --quick run: benchmarks/quick/).

    python -m benchmarks.bench_hybrid [--quick] [--arch qwen3_next] [--size base] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvstore

kvstore.use_openblas()  # before mlx is imported, as bench_agents does

from benchmarks import report  # noqa: E402
from benchmarks.bench_agents import QUESTION_1, QUESTION_2, filler, first_token  # noqa: E402
from benchmarks.common import machine, machine_line  # noqa: E402
from benchmarks.timing import summary  # noqa: E402
from kvstore.agents import AgentManager, resolve_model, turn  # noqa: E402
from kvstore.cache.codec import describe  # noqa: E402

NAME = "hybrid"
PREAMBLE_TOKENS = 1100  # >= 3 whole 256-token chunks shared, and a checkpoint boundary inside the system prompt
REFERENCE = "llama"


def role(i: int | str) -> str:
    return f"\n\nYour role: analyst {i}, who checks every figure twice."


def model_path(arch: str, size: str) -> str:
    from kvstore.models.builtin import builtin_model_path

    return str(builtin_model_path(arch=arch, size=size))


def turn_stats(s) -> dict:
    return {
        "ttft": s.ttft,
        "prompt_tokens": s.prompt_tokens,
        "restored_tokens": s.restored_tokens,
        "prefilled_tokens": s.prefilled_tokens,
    }


def child(args: argparse.Namespace) -> int:
    """One timed turn in this fresh process: `resume` (agent A's next turn) or `cold` (its prompt, prefilled)."""
    handle = resolve_model(args.model_path)
    store = kvstore.open(args.store)
    if args.child == "resume":
        mgr = AgentManager(handle, store, autosave=False)  # every round resumes the same stored turn
        t0 = time.perf_counter()
        agent = mgr.get("a")
        t_get = time.perf_counter() - t0
        out = turn_stats(agent.chat(QUESTION_2, max_tokens=1).stats)
        out["ttft"] += t_get
    else:
        mgr = AgentManager(handle, store, autosave=False)
        agent = mgr.get("a")
        messages = agent.conversation(agent.messages + [{"role": "user", "content": QUESTION_2}])
        prompt = turn.render(handle.tokenizer, messages)
        t0 = time.perf_counter()
        first_token(handle.model, handle.make_cache(), prompt, 0, mgr.prefill_step)
        out = {"ttft": time.perf_counter() - t0, "prompt_tokens": len(prompt), "restored_tokens": 0}
        out["prefilled_tokens"] = len(prompt)
    store.close()
    print(json.dumps(out))
    return 0


def run_child(kind: str, path: str, store: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_hybrid",
        "--child",
        kind,
        "--model-path",
        path,
        "--store",
        str(store),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(root: Path, handle) -> dict:
    """Bytes on disk (blob files) per whole KV chunk and per state checkpoint, from the store's index."""
    kinds = [slot.kind for slot in describe(handle.make_cache())[1]]
    db = sqlite3.connect(root / "index.db")
    # One blob may hold several slots of a chunk: count each blob once per chunk and kind.
    rows = db.execute(
        "SELECT DISTINCT c.key, c.length, cl.layer, b.id, b.nbytes FROM chunk_layers cl "
        "JOIN chunks c ON c.key = cl.chunk_key JOIN blobs b ON b.id = cl.blob_id"
    ).fetchall()
    size = db.execute("SELECT SUM(nbytes) FROM blobs").fetchone()[0]
    db.close()
    blobs: dict = {}  # (kind, chunk key) -> {blob id: bytes}
    for key, length, layer, blob, nbytes in rows:
        kind = "state" if kinds[layer] == "state" else "kv"
        if kind == "state" or length == kvstore.DEFAULT_CHUNK_SIZE:  # KV: whole chunks only
            blobs.setdefault((kind, key), {})[blob] = nbytes
    kv = [sum(b.values()) for (kind, _), b in blobs.items() if kind == "kv"]
    state = [sum(b.values()) for (kind, _), b in blobs.items() if kind == "state"]
    per_chunk = int(statistics.median(kv)) if kv else 0
    per_ckpt = int(statistics.median(state)) if state else 0
    return {
        "state_slots": kinds.count("state"),
        "kv_slots": len(kinds) - kinds.count("state"),
        "kv_bytes_per_chunk": per_chunk,
        "checkpoints": len(state),
        "bytes_per_checkpoint": per_ckpt,
        "checkpoint_over_chunk": per_ckpt / per_chunk if per_chunk else None,
        "store_bytes": size,
    }


def bench_model(arch: str, size: str, root: Path, repeat: int) -> dict:
    path = model_path(arch, size)
    handle = resolve_model(path)
    preamble = filler(handle.tokenizer, PREAMBLE_TOKENS, "h")
    store_dir = root / f"{arch}-store"
    store = kvstore.open(store_dir)
    first = AgentManager(handle, store).create("a", preamble + role("A")).chat(QUESTION_1, max_tokens=8).stats
    checkpoints = disk_bytes(store_dir, handle)

    warm_runs, cold_runs = [], []
    empty = kvstore.open(root / f"{arch}-empty")
    for i in range(repeat + 1):  # round 0 warms MLX's kernels, untimed; who goes first alternates
        sides = (("warm", store, warm_runs), ("cold", empty, cold_runs))
        for _, st, runs in sides if i % 2 else sides[::-1]:
            mgr = AgentManager(handle, st, autosave=False)
            agent = mgr.create(f"n{i}", preamble + role(i))  # the same prompt on both sides of a round
            s = turn_stats(agent.chat(QUESTION_2, max_tokens=1).stats)
            mgr.delete(agent.name)
            if i:
                runs.append(s)
    empty.close()
    store.close()

    resume_runs, resume_cold = [], []
    for i in range(repeat):
        pair = (("resume", resume_runs), ("cold", resume_cold))
        for kind, runs in pair if i % 2 else pair[::-1]:
            runs.append(run_child(kind, path, store_dir))

    def side(runs: list[dict]) -> dict:
        last = runs[-1]
        return {**summary([r["ttft"] for r in runs]), **{k: last[k] for k in last if k != "ttft"}}

    warm, cold, resume, rcold = side(warm_runs), side(cold_runs), side(resume_runs), side(resume_cold)
    return {
        "arch": arch,
        "size": size,
        "model_bytes": handle.nbytes,
        "first_turn_prompt_tokens": first.prompt_tokens,
        "warm": warm,
        "warm_cold": cold,
        "warm_speedup": cold["median"] / warm["median"],
        "resume": resume,
        "resume_cold": rcold,
        "resume_speedup": rcold["median"] / resume["median"],
        "disk": checkpoints,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen3_next", help="the hybrid built-in family")
    p.add_argument("--size", default="base")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds of each measurement")
    p.add_argument("--quick", action="store_true", help="the small size, 2 rounds; writes under benchmarks/quick/")
    p.add_argument("--child", choices=("resume", "cold"), help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    size = "small" if args.quick else args.size
    repeat = 2 if args.quick else args.repeat
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbench-hybrid-") as tmp:
        for arch in (args.arch, REFERENCE):
            r = bench_model(arch, size, Path(tmp), repeat)
            rows.append(r)
            print(
                f"{arch}-{size}: warm {r['warm']['median'] * 1e3:.1f} ms (restored {r['warm']['restored_tokens']}, "
                f"prefilled {r['warm']['prefilled_tokens']}) vs cold {r['warm_cold']['median'] * 1e3:.1f} ms; resume "
                f"{r['resume']['median'] * 1e3:.1f} ms (restored {r['resume']['restored_tokens']}, prefilled "
                f"{r['resume']['prefilled_tokens']}) vs cold {r['resume_cold']['median'] * 1e3:.1f} ms; "
                f"{r['disk']['checkpoints']} checkpoints of {r['disk']['bytes_per_checkpoint']:,} B, "
                f"KV chunk {r['disk']['kv_bytes_per_chunk']:,} B"
            )
    result = {
        "benchmark": NAME,
        "machine": machine(),
        "chunk_size": kvstore.DEFAULT_CHUNK_SIZE,
        "repeat": repeat,
        "rows": rows,
        "load_average_1m": round(max(load, os.getloadavg()[0]), 2),  # the higher of start and end
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report.publish(NAME, {**result, "quick": args.quick}, section(result), quick=args.quick)
    return 0


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    hybrid = r["rows"][0]
    out = [
        "### Hybrid models: warm start, resume and checkpoint bytes (`bench_hybrid.py`)\n",
        f"_{machine_line(r['machine'])}; shared machine, 1-minute load average up to {r['load_average_1m']} "
        f"during the run; built-in models of size {hybrid['size']} (random weights); chunk size {r['chunk_size']}; "
        f"{r['repeat']} alternating rounds; ms are medians._\n",
        f"Agent A's first turn (a long system prompt: {hybrid['first_turn_prompt_tokens']} prompt tokens on "
        f"{hybrid['arch']}) is stored. *Warm start*: a new agent with the same system prompt and its own role asks a question in a new "
        "manager; *cold* is the same prompt in a manager on an empty store. *Resume*: A's next turn in a new "
        "process; *cold* prefills the same rendered prompt in a new process. A hybrid model restores only at a "
        "chunk boundary that has a recurrent-state checkpoint ([ARCHITECTURE.md](ARCHITECTURE.md), "
        '"Recurrent-state checkpoints"); the llama row is the all-attention reference.\n',
        "| model | warm start | cold | restored / prefilled | faster | resume | cold | restored / prefilled | faster |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        w, wc, s, sc = x["warm"], x["warm_cold"], x["resume"], x["resume_cold"]
        out.append(
            f"| {x['arch']}-{x['size']} | {report.fmt_ms(w['median'])} | {report.fmt_ms(wc['median'])} | "
            f"{w['restored_tokens']} / {w['prefilled_tokens']} | {x['warm_speedup']:.1f}× | "
            f"{report.fmt_ms(s['median'])} | {report.fmt_ms(sc['median'])} | "
            f"{s['restored_tokens']} / {s['prefilled_tokens']} | {x['resume_speedup']:.1f}× |"
        )
    out += [
        "",
        "Bytes on disk after A's first turn (blob files, from the store's index): a checkpoint is one blob per "
        "recurrent-state slot, stored at the system prompt's last chunk boundary and at the end of the turn.\n",
        "| model | state slots | attention slots | KV bytes per 256-token chunk | checkpoints | bytes per checkpoint "
        "| checkpoint / chunk | store bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        d = x["disk"]
        ratio = f"{d['checkpoint_over_chunk']:.2f}×" if d["checkpoint_over_chunk"] else "-"
        out.append(
            f"| {x['arch']}-{x['size']} | {d['state_slots']} | {d['kv_slots']} | {d['kv_bytes_per_chunk']:,} | "
            f"{d['checkpoints']} | {d['bytes_per_checkpoint']:,} | {ratio} | {d['store_bytes']:,} |"
        )
    out.append(
        "\nFor real shapes the ratio is far larger (Qwen3-Next-80B-A3B: 12.3×, Qwen3.5-27B: 9.2×; computed from "
        'their config.json in [ARCHITECTURE.md](ARCHITECTURE.md), "Recurrent-state checkpoints").\n'
    )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
