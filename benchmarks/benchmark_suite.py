"""The showcase benchmark suite: kvstore beside mlx-lm's one-file-per-agent prompt caches, in one run.

    python -m benchmarks.benchmark_suite [--quick] [--repeat N] [--only restore,shared,turns,ttft]

Measures, each several times (median, min, max):
  restore   load time of an agent's cache vs context length (synthetic bf16 KV, Qwen2.5-0.5B shapes)
  shared    bytes on disk for 1, 3 and 8 agents that share a long prefix
  turns     bytes written (and time) per chat turn: incremental save vs saving the whole file again
  ttft      time to first token on the built-in model: cold prefill, resume from an mlx-lm file,
            resume through kvstore.agents from the store
The mlx-lm side uses mlx_lm.models.cache.save_prompt_cache / load_prompt_cache, with an fsync
added after each save so both sides are durable. restore, shared and turns are bench_store's measurements
(measure_size, measure_shared_prefix, measure_turns) at the suite's sizes; ttft is bench_agents'.
Writes benchmarks/results/suite.json, its section of docs/BENCHMARKS.md, the headline table of any doc that
carries the `<!-- headline:begin -->` markers, and PNG plots in docs/images/ (reporting: suite_report.py).
A --quick run writes all of these under benchmarks/quick/ instead and leaves the published ones alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import kvstore

kvstore.use_openblas()  # before mlx is imported: MLX's fp32 matmuls on OpenBLAS where installed (Linux)

from benchmarks import report  # noqa: E402
from benchmarks.bench_store import measure_shared_prefix, measure_size, measure_turns  # noqa: E402
from benchmarks.common import machine, machine_line, mlx_cache_like_macos, touch_memory  # noqa: E402
from benchmarks.suite_report import make_plots, render_headline, render_tables  # noqa: E402

NAME = "suite"
HEADLINE_DOCS = [report.ROOT / "README.md", report.ROOT / "docs" / "blog-post.md"]
SHAPE = "qwen2.5-0.5b"
TTFT_SIZE = "tiny"  # built-in model for time to first token (MLX prefill on a 2-core CPU is slow; see docs)

FULL = {
    "sizes": [100, 256, 512, 1024, 2048, 4096],
    "agents": [1, 3, 8],
    "prefix": 2048,
    "private": 256,
    "turn_start": 1024,
    "turns": 8,
    "turn_tokens": 96,
    "contexts": [256, 512, 1024, 2048],
    "repeat": 7,
}
QUICK = {
    "sizes": [100, 512, 2048],
    "agents": [1, 3, 8],
    "prefix": 1024,
    "private": 128,
    "turn_start": 1024,
    "turns": 4,
    "turn_tokens": 96,
    "contexts": [256, 512],
    "repeat": 3,
}


# -- restore time vs context, bytes on disk vs agents, bytes written per turn: bench_store's measurements --


def bench_restore(root: Path, sizes: list[int], repeat: int) -> list[dict]:
    """Time to a fully evaluated cache (warm page cache) and first-save time, vs context length."""
    rows = []
    for n in sizes:
        m = measure_size(root, SHAPE, n, repeat, cold=False)
        shutil.rmtree(root / f"{SHAPE}-{n}")
        for f in root.glob(f"{SHAPE}-{n}-agent-*.safetensors"):
            f.unlink()
        row = {
            "tokens": n,
            "kv_bytes": m["kv_bytes"],
            "mlx_lm_file_bytes": m["mlx_lm_file_bytes"],
            "kvstore_blob_bytes": m["kvstore_blob_bytes"],
            # restored in a fresh process with MLX's cache limit raised, the suite's setting since it began
            "restore": m["restore_warm_raised"],
            "save": m["first_save"],
        }
        rows.append(row)
        print(
            f"  restore {n:5d} tokens: kvstore {row['restore']['kvstore']['median'] * 1e3:7.1f} ms, "
            f"mlx-lm {row['restore']['mlx_lm']['median'] * 1e3:7.1f} ms",
            flush=True,
        )
    return rows


def bench_shared(root: Path, counts: list[int], prefix: int, private: int) -> list[dict]:
    """N agents = one shared prefix + private tokens each; bytes on disk both ways."""
    rows = []
    for n in counts:
        m = measure_shared_prefix(root, SHAPE, n, prefix, private)
        rows.append(
            {
                "agents": n,
                "prefix_tokens": prefix,
                "private_tokens": private,
                "unique_kv_bytes": m["unique_kv_bytes"],
                "kvstore_bytes": m["kvstore_bytes"],
                "kvstore_blob_bytes": m["blob_bytes"],
                "kvstore_dedup_ratio": m["kvstore_dedup_ratio"],
                "mlx_lm_bytes": m["mlx_lm_bytes"],
            }
        )
        print(
            f"  shared  {n} agents: kvstore {m['kvstore_bytes'] / 2**20:6.1f} MiB, "
            f"mlx-lm {m['mlx_lm_bytes'] / 2**20:6.1f} MiB",
            flush=True,
        )
    return rows


def bench_turns(root: Path, start: int, turns: int, per_turn: int, repeat: int) -> dict:
    """A conversation growing by `per_turn` tokens a turn: what each save writes, and how long it takes."""
    r = measure_turns(root, SHAPE, start, turns, per_turn, repeat)
    rows = r["turns"]
    k = ("kvstore_io_bytes", "mlx_lm_io_bytes") if r["measured_io"] else ("kvstore_blob_bytes", "mlx_lm_file_bytes")
    print(
        f"  turns   {turns} x {per_turn} tokens: kvstore wrote {sum(x[k[0]] for x in rows) / 2**20:.1f} MiB, "
        f"mlx-lm {sum(x[k[1]] for x in rows) / 2**20:.1f} MiB",
        flush=True,
    )
    return {key: r[key] for key in ("start_tokens", "turn_tokens", "measured_io", "turns", "bytes_ratio", "time_ratio")}


# -- time to first token on the built-in model -------------------------------------------------


def bench_ttft(root: Path, contexts: list[int], repeat: int) -> dict:
    """Second-turn time to first token: cold prefill vs mlx-lm file resume vs kvstore.agents resume.

    The measurement is bench_agents.bench_resume's (one method for both reports): both resumes render
    the chat template, trim to the common prefix and prefill the rest with generate_step; they differ
    only in where the cache comes from. Rounds alternate which side goes first.
    """
    try:
        from benchmarks.bench_agents import bench_resume
        from kvstore.agents import resolve_model
        from kvstore.models.builtin import builtin_model_path
    except ImportError as e:
        return {"skipped": f"kvstore.agents or the built-in models are not available ({e})"}
    model_dir = builtin_model_path(arch="llama", size=TTFT_SIZE)
    handle = resolve_model(str(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rows = []
    for n in contexts:
        r = bench_resume(root, handle, n, repeat, cold_repeat=3)
        row = {
            "context": r["context_tokens"],
            "prompt_tokens": r["prompt_tokens"],
            "tokens_restored": r["prompt_tokens"] - r["prefilled_tokens"],
            "tokens_prefilled": r["prefilled_tokens"],
            "cold": r["cold"],
            "mlx_lm_file": r["mlx_file"],
            "kvstore": r["ours"],
            "speedup_vs_cold": round(r["speedup_vs_cold"], 2),
            # The ratio of the medians shown beside it; bench_agents also reports the median of paired ratios.
            "ratio_vs_mlx_lm_file": round(r["ours"]["median"] / r["mlx_file"]["median"], 3),
            "paired_ratio_vs_mlx_lm_file": round(r["ratio_vs_mlx_file"], 3),
        }
        rows.append(row)
        print(
            f"  ttft    {row['context']:5d} tokens: cold {row['cold']['median'] * 1e3:7.1f} ms, mlx-lm file "
            f"{row['mlx_lm_file']['median'] * 1e3:7.1f} ms, kvstore {row['kvstore']['median'] * 1e3:7.1f} ms",
            flush=True,
        )
    return {
        "model": {
            "arch": "llama",
            "size": TTFT_SIZE,
            "weights": "random weights",
            "layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size"),
            "kv_heads": config.get("num_key_value_heads"),
            "fingerprint": handle.fingerprint,
        },
        "rows": rows,
    }


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine shows in the times."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer sizes and runs (about a minute); writes benchmarks/quick/"
    )
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (default 7, quick 3)")
    ap.add_argument("--only", default="restore,shared,turns,ttft", help="comma-separated sections to run")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder under benchmarks/)")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON and plots only")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    repeat = args.repeat or plan["repeat"]
    only = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="suite-", dir=args.dir or report.ROOT / "benchmarks"))
    touch_memory()  # both sides then start on memory the VM has already backed (see common.touch_memory)
    cache_limit = mlx_cache_like_macos()  # both sides reuse freed MLX buffers, as on a Mac
    t_start = time.perf_counter()
    r = {
        "machine": machine(),
        "mlx_cache_limit": cache_limit,
        "quick": args.quick,
        "repeat": repeat,
        "date": time.strftime("%Y-%m-%d"),
        "shape": SHAPE,
        "plan": plan,
        "load_average_start": _load(),
    }
    print(
        f"kvstore benchmark suite ({'quick' if args.quick else 'full'}, {repeat} runs) on {machine_line(r['machine'])}"
    )
    try:
        if "restore" in only:
            r["restore"] = bench_restore(root, plan["sizes"], repeat)
        if "ttft" in only:
            r["ttft"] = bench_ttft(root, plan["contexts"], repeat)
        if "shared" in only:
            r["shared"] = bench_shared(root, plan["agents"], plan["prefix"], plan["private"])
        if "turns" in only:
            r["turns"] = bench_turns(root, plan["turn_start"], plan["turns"], plan["turn_tokens"], repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r["seconds"] = round(time.perf_counter() - t_start, 1)
    r["load_average_end"] = _load()
    images = report.images_dir(args.quick)
    r["plots"] = make_plots(r, images)
    print(f"drew {len(r['plots'])} plots in {images.relative_to(report.ROOT)}/")
    report.publish(NAME, r, None if args.no_docs else section(r), quick=args.quick)
    if args.no_docs:
        return
    if args.quick:
        path = report.QUICK / "headline.md"
        path.write_text(render_headline(r) + "\n")
        print(f"wrote {path.relative_to(report.ROOT)} (the README and blog headline tables are untouched)")
        return
    done = [
        p.relative_to(report.ROOT) for p in HEADLINE_DOCS if report.replace_block(p, "headline", render_headline(r))
    ]
    if done:
        print(f"updated the headline table of {', '.join(map(str, done))}")


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    return render_tables(r)


if __name__ == "__main__":
    main()
