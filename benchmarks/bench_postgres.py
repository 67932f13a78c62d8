"""Shared-store benchmark (issue 7): match, save and gc with the index on PostgreSQL vs SQLite, in one run.

Both backends get the very same generated store: a few hundred agents whose prompts share a handful of
system prompts, each saved, then given two turns (incremental saves), with synthetic KV of a small
shape (4 layers x 2 heads x 32 dims, float16). Each operation runs on SQLite and PostgreSQL back to back
(alternating which goes first), blobs on the same local disk, so the ratio PG/SQLite is the index's
cost. Prints a table and writes benchmarks/results/postgres.json.

    python benchmarks/bench_postgres.py [--quick] [--agents N] [--pg-url URL] [--dir DIR]

Without --pg-url (or KVSTORE_BENCH_PG_URL) it starts a throwaway PostgreSQL server of its own on
loopback with the server's default durability (fsync on, synchronous_commit on), as SQLite runs with
synchronous=FULL. Given a URL, it creates and drops a database of its own there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402
from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

import kvstore  # noqa: E402
from common import extend, machine  # noqa: E402

FP = "b7" * 16
RESULTS = Path(__file__).resolve().parent / "results" / "postgres.json"
LAYERS, HEADS, DIM = 4, 2, 32
PROMPTS = (384, 640, 1024, 1536, 2048)  # shared system prompt lengths (tokens)
BACKENDS = ("sqlite", "postgresql")


# -- a throwaway server ------------------------------------------------------------------------------


def _bindir() -> Path | None:
    """The newest local PostgreSQL server's bin directory (Debian layout, then PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]), reverse=True)
    if found:
        return found[0].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_owner(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def throwaway_server(workdir: Path):
    """A PostgreSQL server in workdir on a free loopback port, default durability; yields its admin URL."""
    bindir = _bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries found: install PostgreSQL (Debian: apt-get install "
                         "postgresql) or pass --pg-url")
    workdir.mkdir(parents=True, exist_ok=True)
    data, sock = workdir / "pgdata", workdir / "pgsock"
    sock.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "server.log"), "-w",
                              "-o", f"-k {sock} -h 127.0.0.1 -p {port}", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


@contextlib.contextmanager
def scratch_database(admin_url: str):
    """A new database on the server for this run; dropped afterwards."""
    name = "kvbench_" + uuid.uuid4().hex[:8]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def server_info(store: kvstore.Store) -> dict:
    with store.engine.connect() as conn:
        get = lambda q: conn.execute(text(q)).scalar()  # noqa: E731
        return {"version": get("SHOW server_version"), "fsync": get("SHOW fsync"),
                "synchronous_commit": get("SHOW synchronous_commit"), "shared_buffers": get("SHOW shared_buffers"),
                "connection": f"TCP {store.engine.url.host}:{store.engine.url.port}"}


# -- the generated store -----------------------------------------------------------------------------


def random_cache(n: int, seed: int) -> list:
    """LAYERS KVCache layers holding n positions of random float16 KV."""
    key = mx.random.key(seed)
    cache = []
    for _ in range(LAYERS):
        key, a, b = mx.random.split(key, 3)
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, HEADS, n, DIM), key=a).astype(mx.float16),
                           mx.random.normal((1, HEADS, n, DIM), key=b).astype(mx.float16))
        cache.append(c)
    mx.eval([a for c in cache for a in (c.keys, c.values)])
    return cache


def plan_agents(n: int, seed: int = 0) -> list[tuple[str, list[int], list[list[int]]]]:
    """(name, prompt tokens, [turn tokens, ...]) per agent: a shared system prompt, then the agent's own."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(32000) for _ in range(length)] for length in PROMPTS]
    out = []
    for i in range(n):
        own = [rng.randrange(32000) for _ in range(rng.randint(64, 768))]
        turns = [[rng.randrange(32000) for _ in range(rng.randint(32, 200))] for _ in range(2)]
        out.append((f"agent-{i:04d}", prompts[i % len(prompts)] + own, turns))
    return out


class Counter:
    """Statements and transactions an engine sends: what an operation costs in network round trips.

    Over a network each transaction adds three round trips to its statements: the pool's liveness ping,
    BEGIN and COMMIT (seen in the server's log_statement=all output).
    """

    def __init__(self, store: kvstore.Store):
        self.statements = self.transactions = 0
        event.listen(store.engine, "before_cursor_execute", self._statement)
        event.listen(store.engine, "begin", self._begin)

    def _statement(self, *_args):
        self.statements += 1

    def _begin(self, *_args):
        self.transactions += 1

    def round_trips(self) -> int:
        return self.statements + 3 * self.transactions


def timed(store: kvstore.Store, counter: Counter, fn) -> tuple[float, int, object]:
    """(seconds, round trips, result) of fn(store)."""
    before = counter.round_trips()
    t0 = time.perf_counter()
    result = fn(store)
    return time.perf_counter() - t0, counter.round_trips() - before, result


def both(stores: dict, counters: dict, fn, flip: bool, into: dict, key: str):
    """fn on each backend, in alternating order; records seconds and round trips under `key`."""
    order = BACKENDS[::-1] if flip else BACKENDS
    results = {}
    for b in order:
        secs, trips, results[b] = timed(stores[b], counters[b], fn)
        into.setdefault(key, {}).setdefault(b, {"seconds": [], "round_trips": []})
        into[key][b]["seconds"].append(secs)
        into[key][b]["round_trips"].append(trips)
    return results


def summarize(samples: dict) -> dict:
    """Per operation and backend: median (and total) seconds, median round trips; the PG/SQLite ratio."""
    out = {}
    for op, per in samples.items():
        row = {}
        for b, s in per.items():
            row[b] = {"median_ms": round(statistics.median(s["seconds"]) * 1000, 3),
                      "total_s": round(sum(s["seconds"]), 3), "runs": len(s["seconds"]),
                      "round_trips": statistics.median(s["round_trips"])}
        row["ratio"] = round(row["postgresql"]["median_ms"] / row["sqlite"]["median_ms"], 2) \
            if row["sqlite"]["median_ms"] else None
        out[op] = row
    return out


def run(root: Path, pg_url: str, n_agents: int, n_queries: int) -> dict:
    plans = plan_agents(n_agents)
    stores = {"sqlite": kvstore.open(root / "sqlite-store"),
              "postgresql": kvstore.open(pg_url, blobs=root / "pg-blobs")}
    counters = {b: Counter(s) for b, s in stores.items()}
    samples: dict = {}
    rng = random.Random(1)
    try:
        # Build: every agent's first save, then two turns (incremental saves), on both backends.
        for i, (name, prompt, turns) in enumerate(plans):
            cache, tokens = random_cache(len(prompt), seed=i), list(prompt)
            both(stores, counters, lambda s: s.save(name, cache, tokens, model=FP), i % 2 == 1, samples, "save (new agent)")
            for t, turn in enumerate(turns):
                extend(cache, len(turn), seed=10_000 + 2 * i + t)
                tokens = tokens + turn
                both(stores, counters, lambda s: s.save(name, cache, tokens, model=FP), (i + t) % 2 == 0, samples,
                     "save (turn)")
        stats = {b: s.stats() for b, s in stores.items()}
        assert stats["sqlite"].chunks == stats["postgresql"].chunks and stats["sqlite"].blobs == stats["postgresql"].blobs

        # Match: a returning agent's next turn, a new agent on a known system prompt, and a miss.
        heads = {name: stores["sqlite"].tokens(name) for name, _, _ in plans}
        for q in range(n_queries):
            name = plans[rng.randrange(len(plans))][0]
            ask = heads[name] + [rng.randrange(32000) for _ in range(40)]
            got = both(stores, counters, lambda s: s.match(ask, model=FP).n_tokens, q % 2 == 1, samples, "match (hit)")
            assert got["sqlite"] == got["postgresql"] > 0
            prompt = plans[rng.randrange(len(plans))][1][: PROMPTS[q % len(PROMPTS)]]
            ask = prompt + [rng.randrange(32000) for _ in range(300)]
            both(stores, counters, lambda s: s.match(ask, model=FP).n_tokens, q % 2 == 0, samples,
                 "match (shared prompt)")
            ask = [rng.randrange(32000) for _ in range(1000)]
            got = both(stores, counters, lambda s: s.match(ask, model=FP).n_tokens, q % 2 == 1, samples, "match (miss)")
            assert got["sqlite"] == got["postgresql"] == 0
            if q < n_queries // 2:
                both(stores, counters, lambda s: len(s.load(name, model=FP)[1]), q % 2 == 0, samples, "load")

        # gc: the turns' old snapshots; then a third of the agents deleted; then nothing left to do.
        gc_reports = {}
        for step, before in (("gc (old snapshots)", None), ("gc (a third of the agents deleted)", "delete"),
                             ("gc (nothing to collect)", None)):
            if before == "delete":
                for name, _, _ in plans[::3]:
                    both(stores, counters, lambda s: s.delete(name), False, {}, "delete")
            got = both(stores, counters, lambda s: s.gc(grace=0), step.endswith("deleted)"), samples, step)
            gc_reports[step] = {b: {"snapshots": r.snapshots_removed, "chunks": r.chunks_removed,
                                    "files": r.files_removed} for b, r in got.items()}
            assert gc_reports[step]["sqlite"] == gc_reports[step]["postgresql"], gc_reports[step]
        store_figures = {"agents": n_agents, "snapshots_before_gc": n_agents * 3, "chunks": stats["sqlite"].chunks,
                         "blobs": stats["sqlite"].blobs, "bytes_on_disk": stats["sqlite"].bytes_on_disk,
                         "chunk_size": stores["sqlite"].chunk_size,
                         "kv_shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "dtype": "float16"}}
        server = server_info(stores["postgresql"])
    finally:
        for s in stores.values():
            s.close()
    return {"store": store_figures, "server": server, "operations": summarize(samples), "gc_removed": gc_reports}


def print_table(ops: dict) -> None:
    print(f"\n{'operation (median)':38} {'SQLite ms':>10} {'PG ms':>10} {'PG/SQLite':>10} {'round trips':>12}")
    for op, row in ops.items():
        print(f"{op:38} {row['sqlite']['median_ms']:10.2f} {row['postgresql']['median_ms']:10.2f} "
              f"{row['ratio']:10.2f} {row['postgresql']['round_trips']:12g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=300, help="agents in the generated store (default 300)")
    ap.add_argument("--queries", type=int, default=200, help="match queries of each kind (default 200)")
    ap.add_argument("--quick", action="store_true", help="60 agents, 40 queries: a smoke run")
    ap.add_argument("--pg-url", default=os.environ.get("KVSTORE_BENCH_PG_URL"),
                    help="an existing server (its admin database URL); default: start a throwaway one")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir, deleted after)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.agents, args.queries = 60, 40
    root = Path(tempfile.mkdtemp(prefix="kvbench-pg-", dir=args.dir))
    root.chmod(0o755)  # the server runs as the `postgres` user and keeps its data under here
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            admin = args.pg_url or stack.enter_context(throwaway_server(root / "server"))
            url = stack.enter_context(scratch_database(admin))
            result = run(root, url, args.agents, args.queries)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"machine": machine(), "seconds": round(time.perf_counter() - t0, 1), "quick": args.quick,
              "server_started_by_benchmark": not args.pg_url, **result}
    print_table(result["operations"])
    print(f"\nstore: {result['store']['agents']} agents, {result['store']['chunks']} chunks, "
          f"{result['store']['blobs']} blobs; PostgreSQL {result['server']['version']} "
          f"(fsync {result['server']['fsync']}, synchronous_commit {result['server']['synchronous_commit']}) "
          f"over {result['server']['connection']}; {result['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
