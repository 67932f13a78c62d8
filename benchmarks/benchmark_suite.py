"""The showcase benchmark suite: kvstore beside mlx-lm's one-file-per-agent prompt caches, in one run.

    python benchmarks/benchmark_suite.py [--quick] [--repeat N] [--only restore,shared,turns,ttft]

Measures, each several times (median, min, max):
  restore   load time of an agent's cache vs context length (synthetic bf16 KV, Qwen2.5-0.5B shapes)
  shared    bytes on disk for 1, 3 and 8 agents that share a long prefix
  turns     bytes written (and time) per chat turn: incremental save vs saving the whole file again
  ttft      time to first token on the built-in model: cold prefill, resume from an mlx-lm file,
            resume through kvstore.agents from the store
The mlx-lm side uses mlx_lm.models.cache.save_prompt_cache / load_prompt_cache, with an fsync
added after each save so both sides are durable. Writes benchmarks/results/suite.json, the
generated part of docs/BENCHMARKS.md, the headline table of any doc that carries the
`<!-- headline:begin -->` markers, and PNG plots in docs/images/ (reporting: suite_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import kvstore

kvstore.use_openblas()  # before mlx is imported: MLX's fp32 matmuls on OpenBLAS where installed (Linux)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache  # noqa: E402

from common import (eval_cache, extend, fsync_path, kv_bytes, machine, mlx_cache_like_macos,  # noqa: E402
                    synthetic_cache, timed_pair, touch_memory)
from suite_report import machine_line, make_plots, render_headline, render_tables, replace_block  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "suite.json"
BENCH_MD = ROOT / "docs" / "BENCHMARKS.md"
HEADLINE_DOCS = [ROOT / "README.md", ROOT / "docs" / "blog-post.md"]
SHAPE = "qwen2.5-0.5b"
FP = "5e" * 16  # a fixed model fingerprint for the synthetic caches
TTFT_SIZE = "tiny"  # built-in model for time to first token (MLX prefill on a 2-core CPU is slow; see docs)

FULL = {"sizes": [100, 256, 512, 1024, 2048, 4096], "agents": [1, 3, 8], "prefix": 2048, "private": 256,
        "turn_start": 1024, "turns": 8, "turn_tokens": 96, "contexts": [256, 512, 1024, 2048], "repeat": 7}
QUICK = {"sizes": [100, 512, 2048], "agents": [1, 3, 8], "prefix": 1024, "private": 128,
         "turn_start": 1024, "turns": 4, "turn_tokens": 96, "contexts": [256, 512], "repeat": 3}


def stats(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def written_bytes() -> int | None:
    """Bytes this process has caused to be written to storage (Linux /proc/self/io), None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mlx_save(path: Path, cache: list) -> None:
    """mlx-lm's save, plus the fsync it lacks (it writes the file in place, no fsync)."""
    save_prompt_cache(str(path), cache)
    fsync_path(path)


# -- restore time vs context -------------------------------------------------------------------

def bench_restore(root: Path, sizes: list[int], repeat: int) -> list[dict]:
    """Time to a fully evaluated cache: kvstore.load vs load_prompt_cache, warm page cache."""
    rows = []
    for n in sizes:
        cache = synthetic_cache(SHAPE, n, seed=n)
        toks = list(range(n))
        f = root / f"restore-{n}.safetensors"
        save_t, mlx_save_t = [], []
        for r in range(repeat):
            d = root / f"restore-{n}-{r}"
            with kvstore.open(d) as s:
                t0 = time.perf_counter()
                s.save("agent", cache, toks, model=FP)
                save_t.append(time.perf_counter() - t0)
            if r:
                shutil.rmtree(d)
            # A new file each run, as kvstore writes new blobs each run (rewriting one file is cheaper).
            if f.exists():
                f.unlink()
            t0 = time.perf_counter()
            mlx_save(f, cache)
            mlx_save_t.append(time.perf_counter() - t0)
        with kvstore.open(root / f"restore-{n}-0") as s:
            eval_cache(s.load("agent", model=FP)[0])  # warm code paths and page cache on both sides
            eval_cache(load_prompt_cache(str(f)))
            ours, theirs = timed_pair(lambda: eval_cache(s.load("agent", model=FP)[0]),
                                      lambda: eval_cache(load_prompt_cache(str(f))), repeat)
        row = {"tokens": n, "kv_bytes": kv_bytes(SHAPE, n), "mlx_lm_file_bytes": f.stat().st_size,
               "kvstore_blob_bytes": dir_bytes(root / f"restore-{n}-0" / "blobs"),
               "restore": {"kvstore": ours, "mlx_lm": theirs},
               "save": {"kvstore": stats(save_t), "mlx_lm": stats(mlx_save_t)}}
        for k in ("restore", "save"):
            row[k]["ratio"] = round(row[k]["kvstore"]["median"] / row[k]["mlx_lm"]["median"], 3)
        rows.append(row)
        shutil.rmtree(root / f"restore-{n}-0")
        f.unlink()
        print(f"  restore {n:5d} tokens: kvstore {row['restore']['kvstore']['median'] * 1e3:7.1f} ms, "
              f"mlx-lm {row['restore']['mlx_lm']['median'] * 1e3:7.1f} ms", flush=True)
    return rows


# -- bytes on disk vs agents sharing a prefix --------------------------------------------------

def bench_shared(root: Path, counts: list[int], prefix: int, private: int) -> list[dict]:
    """N agents = one shared prefix + private tokens each; bytes on disk both ways."""
    base = synthetic_cache(SHAPE, prefix, seed=7)
    rows = []
    for n in counts:
        d, files = root / f"shared-{n}", root / f"shared-{n}-files"
        files.mkdir()
        with kvstore.open(d) as s:
            for i in range(n):
                cache = synthetic_cache(SHAPE, 0)
                for c, p in zip(cache, base):
                    c.update_and_fetch(p.keys[..., :prefix, :], p.values[..., :prefix, :])
                extend(cache, private, seed=1000 + i)
                s.save(f"agent-{i}", cache, list(range(prefix)) + [200_000 + i] * private, model=FP)
                mlx_save(files / f"agent-{i}.safetensors", cache)
            st = s.stats()
        rows.append({"agents": n, "prefix_tokens": prefix, "private_tokens": private,
                     "unique_kv_bytes": kv_bytes(SHAPE, prefix + n * private),
                     "kvstore_bytes": dir_bytes(d), "kvstore_blob_bytes": st.bytes_on_disk,
                     "kvstore_dedup_ratio": st.dedup_ratio, "mlx_lm_bytes": dir_bytes(files)})
        shutil.rmtree(d)
        shutil.rmtree(files)
        r = rows[-1]
        print(f"  shared  {n} agents: kvstore {r['kvstore_bytes'] / 2**20:6.1f} MiB, "
              f"mlx-lm {r['mlx_lm_bytes'] / 2**20:6.1f} MiB", flush=True)
    return rows


# -- bytes written per turn --------------------------------------------------------------------

def bench_turns(root: Path, start: int, turns: int, per_turn: int, repeat: int) -> dict:
    """A conversation growing by `per_turn` tokens a turn: what each save writes, and how long it takes."""
    runs = []
    for r in range(repeat):
        cache = synthetic_cache(SHAPE, start, seed=50)
        toks = list(range(start))
        f = root / f"turns-{r}.safetensors"
        per = []
        with kvstore.open(root / f"turns-{r}") as s:
            s.save("agent", cache, toks, model=FP)
            mlx_save(f, cache)
            for t in range(turns):
                extend(cache, per_turn, seed=60 + t)
                toks = toks + list(range(300_000 + t * per_turn, 300_000 + (t + 1) * per_turn))
                w0, t0 = written_bytes(), time.perf_counter()
                snap = s.save("agent", cache, toks, model=FP)
                t_ours, w1 = time.perf_counter() - t0, written_bytes()
                t0 = time.perf_counter()
                mlx_save(f, cache)
                t_mlx, w2 = time.perf_counter() - t0, written_bytes()
                per.append({"turn": t + 1, "context": len(toks), "kvstore_s": t_ours, "mlx_lm_s": t_mlx,
                            "kvstore_blob_bytes": snap.bytes_written, "mlx_lm_file_bytes": f.stat().st_size,
                            "kvstore_io_bytes": None if w0 is None else w1 - w0,
                            "mlx_lm_io_bytes": None if w0 is None else w2 - w1})
        shutil.rmtree(root / f"turns-{r}")
        f.unlink()
        runs.append(per)
    rows = []
    for t in range(turns):
        one = [run[t] for run in runs]
        row = {k: one[0][k] for k in ("turn", "context", "kvstore_blob_bytes", "mlx_lm_file_bytes")}
        for k in ("kvstore_io_bytes", "mlx_lm_io_bytes"):
            row[k] = None if one[0][k] is None else int(statistics.median(x[k] for x in one))
        row["kvstore_s"] = stats([x["kvstore_s"] for x in one])
        row["mlx_lm_s"] = stats([x["mlx_lm_s"] for x in one])
        rows.append(row)
    io = rows[0]["kvstore_io_bytes"] is not None
    ours = sum(r["kvstore_io_bytes" if io else "kvstore_blob_bytes"] for r in rows)
    theirs = sum(r["mlx_lm_io_bytes" if io else "mlx_lm_file_bytes"] for r in rows)
    t_ours = sum(r["kvstore_s"]["median"] for r in rows)
    t_theirs = sum(r["mlx_lm_s"]["median"] for r in rows)
    print(f"  turns   {turns} x {per_turn} tokens: kvstore wrote {ours / 2**20:.1f} MiB, "
          f"mlx-lm {theirs / 2**20:.1f} MiB", flush=True)
    return {"start_tokens": start, "turn_tokens": per_turn, "measured_io": io, "turns": rows,
            "bytes_ratio": round(ours / theirs, 4), "time_ratio": round(t_ours / t_theirs, 4)}


# -- time to first token on the built-in model -------------------------------------------------

def bench_ttft(root: Path, contexts: list[int], repeat: int) -> dict:
    """Second-turn time to first token: cold prefill vs mlx-lm file resume vs kvstore.agents resume.

    The measurement is bench_agents.bench_resume's (one method for both reports): both resumes render
    the chat template, trim to the common prefix and prefill the rest with generate_step; they differ
    only in where the cache comes from. Rounds alternate which side goes first.
    """
    try:
        from bench_agents import bench_resume

        from kvstore.agents import resolve_model
        from kvstore.builtin_models import builtin_model_path
    except ImportError as e:
        return {"skipped": f"kvstore.agents or the built-in models are not available ({e})"}
    model_dir = builtin_model_path(arch="llama", size=TTFT_SIZE)
    handle = resolve_model(str(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rows = []
    for n in contexts:
        r = bench_resume(root, handle, n, repeat, cold_repeat=3)
        row = {"context": r["context_tokens"], "prompt_tokens": r["prompt_tokens"],
               "tokens_restored": r["prompt_tokens"] - r["prefilled_tokens"], "tokens_prefilled": r["prefilled_tokens"],
               "cold": r["cold"], "mlx_lm_file": r["mlx_file"], "kvstore": r["ours"],
               "speedup_vs_cold": round(r["speedup_vs_cold"], 2),
               # The ratio of the medians shown beside it; bench_agents also reports the median of paired ratios.
               "ratio_vs_mlx_lm_file": round(r["ours"]["median"] / r["mlx_file"]["median"], 3),
               "paired_ratio_vs_mlx_lm_file": round(r["ratio_vs_mlx_file"], 3)}
        rows.append(row)
        print(f"  ttft    {row['context']:5d} tokens: cold {row['cold']['median'] * 1e3:7.1f} ms, mlx-lm file "
              f"{row['mlx_lm_file']['median'] * 1e3:7.1f} ms, kvstore {row['kvstore']['median'] * 1e3:7.1f} ms",
              flush=True)
    return {"model": {"arch": "llama", "size": TTFT_SIZE, "weights": "random weights",
                      "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
                      "kv_heads": config.get("num_key_value_heads"), "fingerprint": handle.fingerprint}, "rows": rows}


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the machine shows in the times."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and runs (about a minute)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (default 7, quick 3)")
    ap.add_argument("--only", default="restore,shared,turns,ttft", help="comma-separated sections to run")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder under benchmarks/)")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON and plots only")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    repeat = args.repeat or plan["repeat"]
    only = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="suite-", dir=args.dir or ROOT / "benchmarks"))
    touch_memory()  # both sides then start on memory the VM has already backed (see common.touch_memory)
    cache_limit = mlx_cache_like_macos()  # both sides reuse freed MLX buffers, as on a Mac
    t_start = time.perf_counter()
    r = {"machine": machine(), "mlx_cache_limit": cache_limit, "quick": args.quick, "repeat": repeat, "date": time.strftime("%Y-%m-%d"),
         "shape": SHAPE, "plan": plan, "load_average_start": _load()}
    print(f"kvstore benchmark suite ({'quick' if args.quick else 'full'}, {repeat} runs) on {machine_line(r['machine'])}")
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
    r["plots"] = make_plots(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} and {len(r['plots'])} plots in docs/images/ ({r['seconds']} s)")
    if args.no_docs:
        return
    if not BENCH_MD.exists():
        BENCH_MD.write_text("# Benchmarks\n\n<!-- suite:begin -->\n<!-- suite:end -->\n")
    replace_block(BENCH_MD, "suite", render_tables(r))
    done = [p.relative_to(ROOT) for p in HEADLINE_DOCS if replace_block(p, "headline", render_headline(r))]
    print(f"updated {BENCH_MD.relative_to(ROOT)}" + (f" and the headline table of {', '.join(map(str, done))}"
                                                     if done else ""))


if __name__ == "__main__":
    main()
