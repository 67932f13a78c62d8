"""CLI benchmark (issue 4): `info`/`agents` on a big index, `gc` of 100,000 blobs, fsck vs the disk's read speed.

A store of 10,000 agents and 1,000,000 chunk rows is generated straight through SQL bulk inserts
(real chunk keys from real token ids, their parents, four layer rows per chunk, a blob row per chunk),
then its chunk sizes are filled by the same SQL that fsck --repair runs (kvstore.index.sizes.rebuild; the
0002 migration's backfill does the same); gc gets 100,000 unreferenced small blob files with rows (the
agents it is timed on have 4 KiB blobs from the start, so the index agrees with the files);
fsck runs on a second store of 1 MiB blobs
written by real saves, with the page cache dropped, against a plain sequential read of the same
files in the same run. It also times the command's start-up (issue 17): `import kvstore`, `kvstore --help`,
`kvstore info` and `kvstore agents` on a small store, each as a fresh process, against `python -c pass`.
Prints a table and writes benchmarks/results/cli.json (full runs only).

    python benchmarks/bench_cli.py [--quick] [--dir DIR] [--fsck-gib 3]
    python benchmarks/bench_cli.py --startup-only     # the start-up table alone, in about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import xxhash  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

import kvstore  # noqa: E402
from kvstore.index import sizes  # noqa: E402
from kvstore.cache import codec
from kvstore.index import db
from kvstore.formats import BLOB_SUFFIX  # noqa: E402
from kvstore.cache.keys import chunk_keys  # noqa: E402
from common import drop_page_cache, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cli.json"
CHUNK = 256
LAYERS = 4                      # layer rows per chunk (every layer of a chunk names the chunk's one blob)
BYTES_PER_TOKEN = LAYERS * 2 * 8 * 128 * 2   # 4 layers of K and V, 8 KV heads x 128 dims, bf16
FAMILY = 100                    # agents per family; a family shares a 20-chunk prefix (system prompt, document)
PREFIX_CHUNKS = 20
OLD_SNAPSHOT_EVERY = 5          # every 5th agent also keeps an older snapshot
LIMITS = {"info_s": 1.0, "agents_s": 1.0, "gc_100k_s": 30.0, "fsck_vs_disk": 0.8, "startup_s": 0.3}


def _layout(layers: int) -> str:
    """The layout JSON the engine records for a model of `layers` KVCache layers."""
    cache = [KVCache() for _ in range(layers)]
    for c in cache:
        c.update_and_fetch(mx.zeros((1, 8, 1, 128), dtype=mx.bfloat16), mx.zeros((1, 8, 1, 128), dtype=mx.bfloat16))
    tree, slots, _ = codec.describe(cache)
    return json.dumps(codec.layout_json(tree, slots), sort_keys=True)


def _bulk_connection(index: Path) -> sqlite3.Connection:
    """A connection for bulk loading: no journal, no fsync (the store is scratch until the load ends)."""
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    return conn


def build_big_store(root: Path, n_agents: int = 10_000, unique_chunks: tuple[int, int] = (100, 98),
                    seed: int = 0, small_agents: int = 0, small_bytes: int = 4096) -> dict:
    """The 10,000-agent, ~1,000,000-chunk index (no blob files: info and agents read rows only).

    The first `small_agents` agents (whole families) get `small_bytes` blobs: gc's benchmark gives
    them real files of that size.
    """
    kvstore.open(root, chunk_size=CHUNK, durable=False).close()
    rng = np.random.default_rng(seed)
    now = time.time()
    fps = [xxhash.xxh3_128_hexdigest(f"model-{i}".encode()) for i in range(2)]
    layout = _layout(LAYERS)
    conn = _bulk_connection(root / "index.db")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO models (id, fingerprint, name, layout, created) VALUES (?, ?, ?, ?, ?)",
                     [(i + 1, fp, f"bench-model-{i}", layout, now) for i, fp in enumerate(fps)])
    counts = {"agents": 0, "snapshots": 0, "chunks": 0, "chunk_layers": 0, "blobs": 0, "snapshot_chunks": 0}
    snap_id = 0
    seen: set[bytes] = set()
    for fam in range(0, n_agents, FAMILY):
        model_id = 1 + (fam // FAMILY) % 2
        fp = fps[model_id - 1]
        prefix = rng.integers(0, 150_000, PREFIX_CHUNKS * CHUNK, dtype=np.uint32)
        chunks, layers, blobs, agents, snaps, snap_chunks = [], [], [], [], [], []
        for i in range(fam, min(fam + FAMILY, n_agents)):
            n_unique = unique_chunks[0] if i % 5 else unique_chunks[1]
            own = rng.integers(0, 150_000, n_unique * CHUNK - int(rng.integers(1, CHUNK)), dtype=np.uint32)
            toks = np.concatenate([prefix, own])
            versions = [toks]
            if i % OLD_SNAPSHOT_EVERY == 0:
                versions.insert(0, toks[: toks.size - 700])
            for v, t in enumerate(versions):
                keys = chunk_keys(fp, t, CHUNK)
                snap_id += 1
                snaps.append((snap_id, i + 1, model_id, int(t.size), t.astype("<u4").tobytes(), now - 100 + v,
                              None, 0))
                for seq, key in enumerate(keys):
                    snap_chunks.append((snap_id, seq, key))
                    if key in seen:
                        continue
                    seen.add(key)
                    length = min(CHUNK, int(t.size) - seq * CHUNK)
                    blob = key.hex()  # unique per chunk, like a content hash of its KV would be
                    chunks.append((key, model_id, seq, length, keys[seq - 1] if seq else bytes.fromhex(fp)))
                    nbytes = small_bytes if fam < small_agents else length * BYTES_PER_TOKEN + 400
                    blobs.append((blob, nbytes, now - 100))
                    layers.extend((key, layer, blob, 0) for layer in range(LAYERS))
            meta = json.dumps({"role": f"assistant {i} of family {fam // FAMILY}", "messages": []})
            agents.append((i + 1, f"agent-{i:05d}", model_id, meta, snap_id, now - 100, now - 100 + i / n_agents))
        conn.executemany("INSERT INTO blobs (id, nbytes, created) VALUES (?, ?, ?)", blobs)
        conn.executemany("INSERT INTO chunks (key, model_id, seq, length, parent) VALUES (?, ?, ?, ?, ?)", chunks)
        conn.executemany("INSERT INTO chunk_layers (chunk_key, layer, blob_id, first) VALUES (?, ?, ?, ?)", layers)
        conn.executemany("INSERT INTO agents (id, name, model_id, meta, head, created, updated) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", agents)
        conn.executemany("INSERT INTO snapshots (id, agent_id, model_id, n_tokens, tokens, created, label, pinned) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", snaps)
        conn.executemany("INSERT INTO snapshot_chunks (snapshot_id, seq, chunk_key) VALUES (?, ?, ?)", snap_chunks)
        for k, rows in (("agents", agents), ("snapshots", snaps), ("chunks", chunks), ("chunk_layers", layers),
                        ("blobs", blobs), ("snapshot_chunks", snap_chunks)):
            counts[k] += len(rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    with kvstore.open(root) as store:
        t0 = time.perf_counter()
        with db.transaction(store.engine, write=True, what="filling chunk sizes") as c:
            c.exec_driver_sql("PRAGMA cache_size = -1000000")
            sizes.rebuild(c)
        counts["sizes_rebuild_s"] = round(time.perf_counter() - t0, 1)
        with store.engine.connect() as c:
            counts["size_problems"] = len(sizes.check(c))  # 0: the sizes are what fsck expects
    counts["index_bytes"] = (root / "index.db").stat().st_size
    return counts


def own_blobs(root: Path, agents: list[str]) -> list[tuple[str, int]]:
    """(blob id, bytes) of every blob of these agents that no other agent uses."""
    conn = sqlite3.connect(root / "index.db", isolation_level=None)
    marks = ",".join("?" * len(agents))
    own = conn.execute(f"""
        SELECT DISTINCT cl.blob_id, (SELECT nbytes FROM blobs WHERE id = cl.blob_id) FROM agents a
        JOIN snapshots s ON s.agent_id = a.id
        JOIN snapshot_chunks sc ON sc.snapshot_id = s.id JOIN chunk_layers cl ON cl.chunk_key = sc.chunk_key
        WHERE a.name IN ({marks}) AND NOT EXISTS (
            SELECT 1 FROM snapshot_chunks o JOIN snapshots os ON os.id = o.snapshot_id
            JOIN agents oa ON oa.id = os.agent_id WHERE o.chunk_key = sc.chunk_key AND oa.name NOT IN ({marks}))""",
        agents + agents).fetchall()
    conn.close()
    return own


def give_files(root: Path, own: list[tuple[str, int]], seed: int = 1) -> int:
    """Real blob files, of the sizes their rows say (the agents gc is timed on were generated with small blobs).

    The generated index names blobs without files (a million 4 MiB files would not fit). Returns the files.
    """
    rng = np.random.default_rng(seed)
    blob_dir = root / "blobs"
    for blob, nbytes in own:
        shard = blob_dir / blob[:2]
        shard.mkdir(exist_ok=True)
        (shard / (blob[2:] + BLOB_SUFFIX)).write_bytes(rng.bytes(nbytes))
    os.sync()
    return len(own)


def build_fsck_store(root: Path, gib: float, agents: int = 24) -> int:
    """A store of real saves whose blobs are 1 MiB each (4 layers x 2 KV heads x 128 dims, bf16, 256 tokens)."""
    chunks = int(gib * 1024)  # 1 MiB per chunk
    per_agent = max(1, chunks // agents)
    with kvstore.open(root, chunk_size=CHUNK, durable=False) as store:
        fp = "f5" * 16
        for i in range(agents):
            n = per_agent * CHUNK
            key = mx.random.key(i)
            cache = []
            for _layer in range(4):
                key, a, b = mx.random.split(key, 3)
                c = KVCache()
                c.update_and_fetch(mx.random.normal((1, 2, n, 128), key=a).astype(mx.bfloat16),
                                   mx.random.normal((1, 2, n, 128), key=b).astype(mx.bfloat16))
                cache.append(c)
            toks = np.random.default_rng(i).integers(0, 150_000, n, dtype=np.uint32)
            store.save(f"agent-{i:02d}", cache, toks, model=fp)
            del cache
        total = store.stats().bytes_on_disk
    os.sync()
    return total


def _read_all(paths: list[Path]) -> int:
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def read_files(paths: list[Path], threads: int = 1) -> tuple[int, float]:
    """Plain reads of every file, nothing else done with the bytes: one reader after another, or
    `threads` readers on interleaved files (a virtual or flash disk often serves several streams faster
    than one, and fsck reads with several threads, so the disk's speed is the better of the two)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    if threads == 1:
        return _read_all(paths), time.perf_counter() - t0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(_read_all, [paths[i::threads] for i in range(threads)]))
    return total, time.perf_counter() - t0


def invoke(args: list[str]) -> tuple[float, object]:
    """Run the CLI in-process; (seconds, parsed JSON stdout)."""
    from kvstore.cli.main import cli

    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    dt = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"kvstore {' '.join(args)} exited {result.exit_code}: {result.stderr}")
    return dt, json.loads(result.stdout)


def invoke_plain(args: list[str]) -> None:
    from kvstore.cli.main import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"kvstore {' '.join(args[:4])} exited {result.exit_code}: {result.stderr}")


def _times(ts: list[float]) -> dict:
    return {"median": round(sorted(ts)[len(ts) // 2], 3), "min": round(min(ts), 3), "max": round(max(ts), 3),
            "runs": len(ts)}


def bench_queries(root: Path, repeat: int) -> dict:
    """`info --json` and `agents --json` on the big store, and where their time goes."""
    out: dict = {}
    for cmd in ("info", "agents"):
        times = []
        for _ in range(repeat):
            dt, data = invoke(["--store", str(root), cmd, "--json"])
            times.append(dt)
        out[cmd] = _times(times)
        out[cmd]["rows"] = len(data) if isinstance(data, list) else data["agents"]
    from kvstore.ops import accounting

    with kvstore.open(root) as store:
        parts = {"open": lambda: kvstore.open(root).close(), "stats": store.stats, "agents_list": store.agents,
                 "agent_bytes": lambda: accounting.agent_bytes(store),
                 "show_one": lambda: accounting.chunk_runs(store, "agent-00005")}
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            out.setdefault("parts_s", {})[name] = round(time.perf_counter() - t0, 3)
    return out


def bench_gc(root: Path, n_agents: int, rounds: int) -> dict:
    """Remove whole families of agents (`kvstore rm`), then time `kvstore gc` collecting their blobs.

    Each round starts from a copy of the index as `rm` left it and the same files written again.
    """
    names = [f"agent-{i:05d}" for i in range(n_agents)]
    own = own_blobs(root, names)
    t0 = time.perf_counter()
    for i in range(0, len(names), 500):
        invoke_plain(["--store", str(root), "rm", *names[i : i + 500]])
    rm_s = time.perf_counter() - t0
    kvstore.open(root).close()  # the last connection out checkpoints the WAL into index.db
    saved = root.parent / "index-after-rm.db"
    shutil.copyfile(root / "index.db", saved)
    times, reports = [], []
    for r in range(rounds):
        if r:
            for suffix in ("-wal", "-shm"):
                (root / f"index.db{suffix}").unlink(missing_ok=True)
            shutil.copyfile(saved, root / "index.db")
        blobs = give_files(root, own)
        dt, report = invoke(["--store", str(root), "gc", "--json"])
        times.append(dt)
        reports.append(report)
    saved.unlink()
    return {"agents_removed": n_agents, "unreferenced_blobs": blobs, "rm_seconds": round(rm_s, 2),
            "seconds": _times(times)["median"], "times": _times(times), "report": reports[-1]}


FSCK_THREADS = 4  # kvstore.open's default io_threads, which fsck reads with


def bench_fsck(root: Path, gib: float, rounds: int) -> dict:
    total = build_fsck_store(root, gib)
    with kvstore.open(root) as store:
        paths = [p for _, p in store.blobs.iter_files()]
    dropped = drop_page_cache()
    disk, disk_parallel, fsck = [], [], []
    for _ in range(rounds):
        drop_page_cache()
        nbytes, dt = read_files(paths)
        disk.append(nbytes / dt)
        drop_page_cache()
        nbytes, dt = read_files(paths, threads=FSCK_THREADS)
        disk_parallel.append(nbytes / dt)
        drop_page_cache()
        dt, report = invoke(["--store", str(root), "fsck", "--json"])
        if not report["ok"]:
            raise RuntimeError(f"fsck found problems in the benchmark store: {report['problems'][:3]}")
        fsck.append(report["bytes_checked"] / dt)
    best_disk, best_fsck = max(disk + disk_parallel), max(fsck)
    return {"blobs": len(paths), "bytes": total, "page_cache_dropped": dropped,
            "disk_mb_s": [round(x / 1e6, 1) for x in disk + disk_parallel],
            "disk_sequential_mb_s": [round(x / 1e6, 1) for x in disk],
            f"disk_{FSCK_THREADS}_readers_mb_s": [round(x / 1e6, 1) for x in disk_parallel],
            "fsck_mb_s": [round(x / 1e6, 1) for x in fsck],
            "ratio": round(best_fsck / best_disk, 3)}


def _wall(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return dt


def bench_startup(root: Path, rounds: int = 10) -> dict:
    """Wall time of fresh processes: the interpreter alone, `import kvstore`, and three commands.

    The commands are the installed console script; `info` and `agents` read a store of two agents.
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
        "kvstore info": [script, "info"],
        "kvstore agents": [script, "agents"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds + 1):
        for name, argv in cases.items():
            dt = _wall(argv, env)
            if r:
                times[name].append(dt)
    base = statistics.median(times["python -c pass"])
    return {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                   "over_python_s": round(statistics.median(t) - base, 3), "rounds": rounds}
            for name, t in times.items()}


def print_startup(rows: dict) -> None:
    print(f"\nstart-up, fresh processes (median of {next(iter(rows.values()))['rounds']}; "
          f"target < {LIMITS['startup_s']} s):")
    print(f"{'command':30} {'median s':>9} {'min s':>7} {'- python':>9}")
    for name, r in rows.items():
        verdict = "" if name.startswith("python -c pass") else (
            "ok" if r["median_s"] < LIMITS["startup_s"] else "MISSED")
        print(f"{name:30} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['over_python_s']:9.3f}  {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--startup-only", action="store_true", help="only time the command's start-up")
    p.add_argument("--quick", action="store_true", help="1,000 agents, ~10,000 gc blobs, 0.5 GiB for fsck")
    p.add_argument("--dir", help="where to build the stores (default: a temporary folder, removed at the end)")
    p.add_argument("--fsck-gib", type=float, default=3.0, help="GiB of 1 MiB blobs for the fsck run")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="kvstore-bench-cli-"))
    base.mkdir(parents=True, exist_ok=True)
    if args.startup_only:
        try:
            print_startup(bench_startup(base / "startup", rounds=args.repeat * 3))
        finally:
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
        return
    n_agents = 1_000 if args.quick else 10_000
    n_gc = 100 if args.quick else 1_000   # agents removed: ~100 unique chunks (blobs) each
    gib = 0.5 if args.quick else args.fsck_gib
    t_start = time.perf_counter()
    results: dict = {"machine": machine(), "quick": args.quick, "limits": LIMITS}
    try:
        results["startup"] = bench_startup(base / "startup", rounds=args.repeat * 3)
        print_startup(results["startup"])
        big = base / "big"
        t0 = time.perf_counter()
        results["store"] = build_big_store(big, n_agents=n_agents, small_agents=n_gc)
        results["store"]["generate_s"] = round(time.perf_counter() - t0, 1)
        print(f"generated {results['store']['agents']:,} agents, {results['store']['chunks']:,} chunks in "
              f"{results['store']['generate_s']}s", flush=True)
        results["queries"] = bench_queries(big, args.repeat)
        print(f"info {results['queries']['info']['median']}s, agents {results['queries']['agents']['median']}s",
              flush=True)
        results["gc"] = bench_gc(big, n_gc, rounds=args.repeat)
        print(f"gc of {results['gc']['unreferenced_blobs']:,} blobs: {results['gc']['seconds']}s", flush=True)
        shutil.rmtree(big)
        results["fsck"] = bench_fsck(base / "fsck", gib, rounds=2)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def verdicts(r: dict) -> list[tuple[str, str, str, str]]:
    """(measure, figure, limit, ok?) rows of the issue's Speed section."""
    q, g, f = r["queries"], r["gc"], r["fsck"]
    rows = [
        ("info --json", f"{q['info']['median']:.2f} s", f"< {LIMITS['info_s']:.0f} s", q["info"]["median"] < LIMITS["info_s"]),
        ("agents --json", f"{q['agents']['median']:.2f} s", f"< {LIMITS['agents_s']:.0f} s",
         q["agents"]["median"] < LIMITS["agents_s"]),
        (f"gc of {g['unreferenced_blobs']:,} blobs", f"{g['seconds']:.1f} s", f"< {LIMITS['gc_100k_s']:.0f} s",
         g["seconds"] < LIMITS["gc_100k_s"]),
        ("fsck / cold disk read", f"{max(f['fsck_mb_s']):.0f} / {max(f['disk_mb_s']):.0f} MB/s = {f['ratio']:.2f}",
         f">= {LIMITS['fsck_vs_disk']:.2f}", f["ratio"] >= LIMITS["fsck_vs_disk"]),
    ]
    return [(a, b, c, "ok" if d else "MISSED") for a, b, c, d in rows]


def print_table(r: dict) -> None:
    s = r["store"]
    print(f"\nstore: {s['agents']:,} agents, {s['snapshots']:,} snapshots, {s['chunks']:,} chunks, "
          f"{s['chunk_layers']:,} layer rows, {s['snapshot_chunks']:,} snapshot-chunk rows, "
          f"index {s['index_bytes'] / 2**30:.1f} GiB; chunk sizes filled in {s['sizes_rebuild_s']} s")
    print(f"gc runs (s): {r['gc']['times']}")
    rows = verdicts(r)
    widths = [max(len(x[i]) for x in rows + [("measure", "figure", "limit", "")]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(("measure", "figure", "limit", ""), widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"query parts (s): {r['queries']['parts_s']}")
    print(f"fsck store: {r['fsck']['blobs']:,} blobs, {r['fsck']['bytes'] / 2**30:.2f} GiB; "
          f"disk {r['fsck']['disk_mb_s']} MB/s, fsck {r['fsck']['fsck_mb_s']} MB/s")


if __name__ == "__main__":
    main()
