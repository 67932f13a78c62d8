"""Storage engine benchmark (issues 2, 15): kvstore vs mlx-lm's save_prompt_cache/load_prompt_cache, in one run.

Synthetic bf16 KV in the real shapes of Qwen2.5-0.5B and Llama-3-8B at 512, 2048 and 4096 tokens.
Saves are timed in this process, which keeps MLX's defaults. Restores are timed, with a warm and a
cold page cache, in two fresh processes per size, both sides side by side in each: one with MLX's
defaults (what a user's process gets; on Linux MLX keeps only 32 MiB of freed buffers for reuse)
and one with MLX's buffer cache raised to its memory limit (MLX's default on macOS). Prints a table
and writes benchmarks/results/store.json (a --quick run writes nothing). Ratios are kvstore / mlx-lm
(lower is better).

    python benchmarks/bench_store.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache  # noqa: E402

import kvstore  # noqa: E402
from common import (drop_page_cache, eval_cache, extend, fsync_path, kv_bytes, machine,  # noqa: E402
                    mlx_cache_like_macos, synthetic_cache, timed, timed_pair, touch_memory)

FP = "be" * 16
RESULTS = Path(__file__).resolve().parent / "results" / "store.json"
SETTINGS = ("default", "raised")  # MLX's cache limit in the restoring process: as it comes, or its memory limit
TARGETS = {  # ratio limits from the issues: (must, target); restores from issue 15, the rest from issue 2
    "restore_warm": (1.25, 1.0), "restore_cold": (1.25, 1.0),
    "restore_warm_raised": (1.25, 1.0), "restore_cold_raised": (1.25, 1.0), "first_save": (1.5, None),
    "turn_bytes": (0.1, None), "turn_time": (0.2, None), "shared_prefix_bytes": (1.05, None),
    "chunk_keys_100k_ms": (5.0, None), "restore_peak_memory": (1.5, None),
}


def _agent_file(root: Path, shape: str, n: int, r: int) -> Path:
    return root / f"{shape}-{n}-agent-{r}.safetensors"


def bench_size(root: Path, shape: str, n: int, repeat: int, cold: bool) -> dict:
    """Save one agent of n tokens both ways (here), then restore it both ways in fresh processes."""
    caches = [synthetic_cache(shape, n, seed=n + r) for r in range(repeat)]
    store_dir = root / f"{shape}-{n}"
    out = {"shape": shape, "tokens": n, "kv_bytes": kv_bytes(shape, n)}
    store = kvstore.open(store_dir)
    try:
        # First save of a new agent (nothing to dedup against: other tokens, other KV each run).
        ours, theirs = [], []
        for r, cache in enumerate(caches):
            # A new agent gets a new file (one file per agent), as a new agent gets new blobs here.
            mlx_file = _agent_file(root, shape, n, r)

            def save_ours(r=r, cache=cache):
                store.save(f"agent-{r}", cache, list(range(r * n, (r + 1) * n)), model=FP)

            def save_mlx(cache=cache, mlx_file=mlx_file):
                save_prompt_cache(str(mlx_file), cache)
                fsync_path(mlx_file)  # durable like ours: the issue times mlx-lm with an fsync added

            sides = [(save_ours, ours), (save_mlx, theirs)]
            for fn, into in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                os.sync()  # start each timed save with no one else's dirty pages in the way
                t0 = time.perf_counter()
                fn()
                into.append(time.perf_counter() - t0)
        out["first_save"] = {"kvstore": _stats(ours), "mlx_lm": _stats(theirs)}
    finally:
        store.close()
    del caches
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--restore-child", setting, "--root", str(root),
                               "--shape", shape, "--tokens", str(n), "--repeat", str(repeat)]
                              + (["--cold"] if cold else []), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the {setting} restore of {shape} {n} failed:\n{proc.stderr}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        suffix = "" if setting == "default" else f"_{setting}"
        for key, value in got.items():
            out[key + suffix] = value
    for key in list(out):
        if key.startswith(("first_save", "restore_")):
            out[key]["ratio"] = round(out[key]["kvstore"]["median"] / out[key]["mlx_lm"]["median"], 3)
    return out


def _restore_child(args) -> None:
    """Runs in a fresh process: warm and cold restores of one size, both sides, in one setting."""
    limit = mlx_cache_like_macos() if args.restore_child == "raised" else None
    root, shape, n, repeat = Path(args.root), args.shape, args.tokens, args.repeat
    last = f"agent-{repeat - 1}"
    mlx_file = _agent_file(root, shape, n, repeat - 1)
    out = {}
    with kvstore.open(root / f"{shape}-{n}") as store:
        load = lambda: eval_cache(store.load(last, model=FP)[0])  # noqa: E731
        mlx_load = lambda: eval_cache(load_prompt_cache(str(mlx_file)))  # noqa: E731
        load(), mlx_load()  # warm the page cache and the code paths
        warm = timed_pair(load, mlx_load, 2 * repeat + 1)  # cheap, so more runs: a steadier median
        out["restore_warm"] = {"kvstore": warm[0], "mlx_lm": warm[1], "mlx_cache_limit": limit}
        if args.cold:
            cold_runs = timed_pair(load, mlx_load, repeat, before=drop_page_cache)
            out["restore_cold"] = {"kvstore": cold_runs[0], "mlx_lm": cold_runs[1], "mlx_cache_limit": limit}
    print(json.dumps(out))


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"median": s[len(s) // 2], "min": s[0], "max": s[-1], "runs": len(s)}


def bench_turn(root: Path, shape: str, repeat: int) -> dict:
    """Saving after a 32-token turn on a 4096-token agent vs mlx-lm writing the whole file again."""
    results = {"kvstore_s": [], "mlx_lm_s": [], "kvstore_bytes": 0, "mlx_lm_bytes": 0}
    for r in range(repeat):
        cache = synthetic_cache(shape, 4096, seed=11)
        toks = list(range(4096))
        d = root / f"turn-{r}"
        with kvstore.open(d) as store:
            store.save("agent", cache, toks, model=FP)
            extend(cache, 32, seed=12 + r)
            os.sync()
            t0 = time.perf_counter()
            snap = store.save("agent", cache, toks + list(range(5000, 5032)), model=FP)
            results["kvstore_s"].append(time.perf_counter() - t0)
            results["kvstore_bytes"] = snap.bytes_written
        f = root / f"turn-{r}.safetensors"
        os.sync()
        t0 = time.perf_counter()
        save_prompt_cache(str(f), cache)
        fsync_path(f)
        results["mlx_lm_s"].append(time.perf_counter() - t0)
        results["mlx_lm_bytes"] = f.stat().st_size
        shutil.rmtree(d)
        f.unlink()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"shape": shape, "kvstore_s": med(results["kvstore_s"]), "mlx_lm_s": med(results["mlx_lm_s"]),
            "kvstore_bytes": results["kvstore_bytes"], "mlx_lm_bytes": results["mlx_lm_bytes"],
            "bytes_ratio": round(results["kvstore_bytes"] / results["mlx_lm_bytes"], 4),
            "time_ratio": round(med(results["kvstore_s"]) / med(results["mlx_lm_s"]), 4)}


def bench_shared_prefix(root: Path, shape: str) -> dict:
    """8 agents sharing a 2048-token prefix with 512 private tokens each: bytes on disk vs unique KV."""
    prefix = synthetic_cache(shape, 2048, seed=21)
    d = root / "shared"
    mlx_bytes = 0
    with kvstore.open(d) as store:
        for i in range(8):
            cache = synthetic_cache(shape, 0)
            for c, p in zip(cache, prefix):
                c.update_and_fetch(p.keys[..., :2048, :], p.values[..., :2048, :])
            extend(cache, 512, seed=100 + i)
            store.save(f"agent-{i}", cache, list(range(2048)) + [10_000 + i] * 512, model=FP)
            f = root / f"shared-{i}.safetensors"
            save_prompt_cache(str(f), cache)
            mlx_bytes += f.stat().st_size
            f.unlink()
        blob_bytes = sum(p.stat().st_size for _, p in store.blobs.iter_files())
    index_bytes = sum(p.stat().st_size for p in d.glob("index.db*"))
    unique = kv_bytes(shape, 2048 + 8 * 512)
    shutil.rmtree(d)
    return {"shape": shape, "unique_kv_bytes": unique, "blob_bytes": blob_bytes, "index_bytes": index_bytes,
            "mlx_lm_files_bytes": mlx_bytes, "ratio": round((blob_bytes + index_bytes) / unique, 4),
            "vs_mlx_lm": round((blob_bytes + index_bytes) / mlx_bytes, 4)}


def bench_chunk_keys() -> dict:
    import numpy as np

    toks = np.random.default_rng(0).integers(0, 150_000, 100_000)
    t = timed(lambda: kvstore.chunk_keys(FP, toks, 256), repeat=20)
    return {"tokens": 100_000, "ms": round(t["median"] * 1000, 3), "min_ms": round(t["min"] * 1000, 3)}


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _peak_child(args) -> None:
    """Runs in a fresh process: peak RSS of one restore above the RSS just before it."""
    kind, path = args.peak_child, args.peak_path
    store = kvstore.open(path) if kind == "kvstore" else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak RSS, to the current RSS
    baseline = _status("VmRSS")
    cache = store.load("agent-0", model=FP)[0] if store else load_prompt_cache(path)
    eval_cache(cache)
    peak = _status("VmHWM")
    nbytes = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    print(json.dumps({"baseline": baseline, "peak": peak, "cache_bytes": nbytes}))


def bench_peak(root: Path, shape: str, n: int) -> dict:
    out = {"shape": shape, "tokens": n}
    store_dir = root / f"{shape}-{n}"
    for kind, path in (("kvstore", store_dir), ("mlx_lm", root / f"{shape}-{n}-agent-0.safetensors")):
        proc = subprocess.run([sys.executable, __file__, "--peak-child", kind, "--peak-path", str(path)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[kind] = {"above_baseline": r["peak"] - r["baseline"], "cache_bytes": r["cache_bytes"],
                     "ratio_to_cache": round((r["peak"] - r["baseline"]) / r["cache_bytes"], 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 and 2048 tokens of Qwen2.5-0.5B only")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir beside the results)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    ap.add_argument("--peak-path", help=argparse.SUPPRESS)
    ap.add_argument("--restore-child", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        return _peak_child(args)
    if args.restore_child:
        return _restore_child(args)
    root = Path(tempfile.mkdtemp(prefix="kvbench-", dir=args.dir or RESULTS.parent.parent))
    touch_memory()
    cold = drop_page_cache()
    plan = [("qwen2.5-0.5b", n) for n in (512, 2048, 4096)] + [("llama-3-8b", n) for n in (512, 2048, 4096)]
    if args.quick:
        plan = [("qwen2.5-0.5b", 512), ("qwen2.5-0.5b", 2048)]
    t_start, load_start = time.perf_counter(), _load_average()
    try:
        sizes = []
        for shape, n in plan:
            sizes.append(bench_size(root, shape, n, args.repeat, cold))
            s = sizes[-1]
            print(f"  {shape:13s} {n:5d} tokens: restore warm {s['restore_warm']['ratio']:.2f}x"
                  f" (raised {s['restore_warm_raised']['ratio']:.2f}x)"
                  + (f", cold {s['restore_cold']['ratio']:.2f}x (raised {s['restore_cold_raised']['ratio']:.2f}x)"
                     if cold else "")
                  + f", first save {s['first_save']['ratio']:.2f}x", flush=True)
        big = plan[-1]
        peak = bench_peak(root, *big)
        turn = bench_turn(root, big[0], args.repeat)
        shared = bench_shared_prefix(root, "qwen2.5-0.5b")
        keys = bench_chunk_keys()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = {"machine": machine(), "settings": {"default": "MLX's defaults in a fresh process",
                                                  "raised": "a fresh process with MLX's cache limit at its memory limit"},
               "page_cache_dropped": cold, "seconds": round(time.perf_counter() - t_start, 1),
               "load_average": [load_start, _load_average()],  # 1-minute, at start and end: a shared machine's noise
               "sizes": sizes, "turn_32_on_4096": turn, "shared_prefix_8x": shared, "chunk_keys": keys,
               "restore_peak_memory": peak, "targets": TARGETS}
    results["summary"] = summary(results)
    if not args.quick:  # a quick run never replaces the published results
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, written=not args.quick)


def summary(r: dict) -> dict:
    """The issue's ratios, worst case over sizes, each with its limit and whether it is met."""
    worst = lambda key: max(s[key]["ratio"] for s in r["sizes"] if key in s)  # noqa: E731
    rows = {"restore_warm": worst("restore_warm"), "restore_warm_raised": worst("restore_warm_raised"),
            "first_save": worst("first_save"),
            "turn_bytes": r["turn_32_on_4096"]["bytes_ratio"], "turn_time": r["turn_32_on_4096"]["time_ratio"],
            "shared_prefix_bytes": r["shared_prefix_8x"]["ratio"], "chunk_keys_100k_ms": r["chunk_keys"]["ms"],
            "restore_peak_memory": r["restore_peak_memory"]["kvstore"]["ratio_to_cache"]}
    if r["page_cache_dropped"]:
        rows["restore_cold"] = worst("restore_cold")
        rows["restore_cold_raised"] = worst("restore_cold_raised")
    return {k: {"value": v, "must": TARGETS[k][0], "target": TARGETS[k][1], "met": v <= TARGETS[k][0]}
            for k, v in rows.items()}


def print_table(r: dict, written: bool) -> None:
    print(f"\nkvstore vs mlx-lm (ratios are kvstore / mlx-lm; {r['machine']['cpu']}, {r['machine']['cores']} cores;"
          " restores in fresh processes with MLX's defaults, and with its cache limit raised)")
    print(f"{'shape':14s}{'tokens':>7s}{'MiB':>8s}{'save':>8s}{'warm':>8s}{'cold':>8s}{'warm*':>8s}{'cold*':>8s}"
          f"   (* raised; medians of {r['sizes'][0]['first_save']['kvstore']['runs']})")
    for s in r["sizes"]:
        cells = "".join(f"{s[k]['ratio']:8.2f}" if k in s else f"{'-':>8s}"
                        for k in ("first_save", "restore_warm", "restore_cold", "restore_warm_raised",
                                  "restore_cold_raised"))
        print(f"{s['shape']:14s}{s['tokens']:7d}{s['kv_bytes'] / 2**20:8.1f}{cells}")
    print("\nlimits (worst case over sizes):")
    for k, v in r["summary"].items():
        print(f"  {k:22s} {v['value']:>9}  must <= {v['must']:<6} {'met' if v['met'] else 'NOT MET'}")
    print(f"\n{'wrote ' + str(RESULTS) if written else 'a quick run: nothing written'} in {r['seconds']} s")


if __name__ == "__main__":
    main()
