"""Shared-store benchmark (issue 7): match, save and gc with the index on PostgreSQL vs SQLite, in one run.

Both backends get the very same generated store: a few hundred agents whose prompts share a handful of
system prompts, each saved, then given two turns (incremental saves), with synthetic KV of a small
shape (4 layers x 2 heads x 32 dims, float16). Each operation runs on SQLite and PostgreSQL back to back
(alternating which goes first), blobs on the same local disk, so the ratio PG/SQLite is the index's
cost. Prints a table and writes benchmarks/results/postgres.json and its section of docs/BENCHMARKS.md
(a --quick run: benchmarks/quick/ instead).

    python -m benchmarks.bench_postgres [--quick] [--agents N] [--pg-url URL] [--dir DIR]

Without --pg-url (or KVSTORE_BENCH_PG_URL) it starts a throwaway PostgreSQL server of its own on
loopback with the server's default durability (fsync on, synchronous_commit on), as SQLite runs with
synchronous=FULL. Given a URL, it creates and drops a database of its own there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import mlx.core as mx
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import kvstore
from benchmarks import report
from benchmarks.common import machine, machine_line
from benchmarks.timing import summary
from kvstore.testing import extend, random_cache

NAME = "postgres"
FP = "b7" * 16
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
        raise SystemExit(
            "no PostgreSQL server binaries found: install PostgreSQL (Debian: apt-get install "
            "postgresql) or pass --pg-url"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    data, sock = workdir / "pgdata", workdir / "pgsock"
    sock.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run(
        _as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        _as_owner(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(workdir / "server.log"),
                "-w",
                "-o",
                f"-k {sock} -h 127.0.0.1 -p {port}",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True
        )


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
        return {
            "version": get("SHOW server_version"),
            "fsync": get("SHOW fsync"),
            "synchronous_commit": get("SHOW synchronous_commit"),
            "shared_buffers": get("SHOW shared_buffers"),
            "connection": f"TCP {store.engine.url.host}:{store.engine.url.port}",
        }


# -- the generated store -----------------------------------------------------------------------------


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


def timed_op(store: kvstore.Store, counter: Counter, fn) -> tuple[float, int, object]:
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
        secs, trips, results[b] = timed_op(stores[b], counters[b], fn)
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
            row[b] = {
                "median_ms": round(summary(s["seconds"])["median"] * 1000, 3),
                "total_s": round(sum(s["seconds"]), 3),
                "runs": len(s["seconds"]),
                "round_trips": summary(s["round_trips"])["median"],
            }
        row["ratio"] = (
            round(row["postgresql"]["median_ms"] / row["sqlite"]["median_ms"], 2)
            if row["sqlite"]["median_ms"]
            else None
        )
        out[op] = row
    return out


def run(root: Path, pg_url: str, n_agents: int, n_queries: int) -> dict:
    plans = plan_agents(n_agents)
    stores = {
        "sqlite": kvstore.open(root / "sqlite-store"),
        "postgresql": kvstore.open(pg_url, blobs=root / "pg-blobs"),
    }
    counters = {b: Counter(s) for b, s in stores.items()}
    samples: dict = {}
    rng = random.Random(1)
    try:
        # Build: every agent's first save, then two turns (incremental saves), on both backends.
        for i, (name, prompt, turns) in enumerate(plans):
            cache = random_cache(len(prompt), layers=LAYERS, heads=HEADS, dim=DIM, dtype=mx.float16, seed=i)
            tokens = list(prompt)
            both(
                stores,
                counters,
                lambda s, name=name, cache=cache, tokens=tokens: s.save(name, cache, tokens, model=FP),
                i % 2 == 1,
                samples,
                "save (new agent)",
            )
            for t, turn in enumerate(turns):
                extend(cache, len(turn), seed=10_000 + 2 * i + t)
                tokens = tokens + turn
                both(
                    stores,
                    counters,
                    lambda s, name=name, cache=cache, tokens=tokens: s.save(name, cache, tokens, model=FP),
                    (i + t) % 2 == 0,
                    samples,
                    "save (turn)",
                )
        stats = {b: s.stats() for b, s in stores.items()}
        assert (
            stats["sqlite"].chunks == stats["postgresql"].chunks and stats["sqlite"].blobs == stats["postgresql"].blobs
        )

        # Match: a returning agent's next turn, a new agent on a known system prompt, and a miss.
        heads = {name: stores["sqlite"].tokens(name) for name, _, _ in plans}
        for q in range(n_queries):
            name = plans[rng.randrange(len(plans))][0]
            ask = heads[name] + [rng.randrange(32000) for _ in range(40)]
            got = both(
                stores, counters, lambda s, ask=ask: s.match(ask, model=FP).n_tokens, q % 2 == 1, samples, "match (hit)"
            )
            assert got["sqlite"] == got["postgresql"] > 0
            prompt = plans[rng.randrange(len(plans))][1][: PROMPTS[q % len(PROMPTS)]]
            ask = prompt + [rng.randrange(32000) for _ in range(300)]
            both(
                stores,
                counters,
                lambda s, ask=ask: s.match(ask, model=FP).n_tokens,
                q % 2 == 0,
                samples,
                "match (shared prompt)",
            )
            ask = [rng.randrange(32000) for _ in range(1000)]
            got = both(
                stores,
                counters,
                lambda s, ask=ask: s.match(ask, model=FP).n_tokens,
                q % 2 == 1,
                samples,
                "match (miss)",
            )
            assert got["sqlite"] == got["postgresql"] == 0
            if q < n_queries // 2:
                both(stores, counters, lambda s, name=name: len(s.load(name, model=FP)[1]), q % 2 == 0, samples, "load")

        # gc: the turns' old snapshots; then a third of the agents deleted; then nothing left to do.
        gc_reports = {}
        for step, before in (
            ("gc (old snapshots)", None),
            ("gc (a third of the agents deleted)", "delete"),
            ("gc (nothing to collect)", None),
        ):
            if before == "delete":
                for name, _, _ in plans[::3]:
                    both(stores, counters, lambda s, name=name: s.delete(name), False, {}, "delete")
            got = both(stores, counters, lambda s: s.gc(grace=0), step.endswith("deleted)"), samples, step)
            gc_reports[step] = {
                b: {"snapshots": r.snapshots_removed, "chunks": r.chunks_removed, "files": r.files_removed}
                for b, r in got.items()
            }
            assert gc_reports[step]["sqlite"] == gc_reports[step]["postgresql"], gc_reports[step]
        store_figures = {
            "agents": n_agents,
            "snapshots_before_gc": n_agents * 3,
            "chunks": stats["sqlite"].chunks,
            "blobs": stats["sqlite"].blobs,
            "bytes_on_disk": stats["sqlite"].bytes_on_disk,
            "chunk_size": stores["sqlite"].chunk_size,
            "kv_shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "dtype": "float16"},
        }
        server = server_info(stores["postgresql"])
    finally:
        for s in stores.values():
            s.close()
    return {"store": store_figures, "server": server, "operations": summarize(samples), "gc_removed": gc_reports}


def print_table(ops: dict) -> None:
    print(f"\n{'operation (median)':38} {'SQLite ms':>10} {'PG ms':>10} {'PG/SQLite':>10} {'round trips':>12}")
    for op, row in ops.items():
        print(
            f"{op:38} {row['sqlite']['median_ms']:10.2f} {row['postgresql']['median_ms']:10.2f} "
            f"{row['ratio']:10.2f} {row['postgresql']['round_trips']:12g}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=300, help="agents in the generated store (default 300)")
    ap.add_argument("--queries", type=int, default=200, help="match queries of each kind (default 200)")
    ap.add_argument("--quick", action="store_true", help="60 agents, 40 queries: a smoke run")
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("KVSTORE_BENCH_PG_URL"),
        help="an existing server (its admin database URL); default: start a throwaway one",
    )
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir, deleted after)")
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
    result = {
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "quick": args.quick,
        "server_started_by_benchmark": not args.pg_url,
        **result,
    }
    print_table(result["operations"])
    print(
        f"\nstore: {result['store']['agents']} agents, {result['store']['chunks']} chunks, "
        f"{result['store']['blobs']} blobs; PostgreSQL {result['server']['version']} "
        f"(fsync {result['server']['fsync']}, synchronous_commit {result['server']['synchronous_commit']}) "
        f"over {result['server']['connection']}; {result['seconds']} s"
    )
    report.publish(NAME, result, section(result), quick=args.quick)


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    s, sv = r["store"], r["server"]
    out = [
        "### Shared store: PostgreSQL against SQLite (`bench_postgres.py`)\n",
        f"_{machine_line(r['machine'])}; PostgreSQL {sv['version']} over {sv['connection'].split()[0]} loopback, "
        f"fsync {sv['fsync']}, synchronous_commit {sv['synchronous_commit']}; SQLite synchronous=FULL._\n",
        f"The same generated store on both: {s['agents']} agents, {s['snapshots_before_gc']} snapshots, "
        f"{s['chunks']:,} chunks, {s['bytes_on_disk'] / 2**20:.0f} MiB of blobs on the same local disk.\n",
        "| operation | SQLite ms | PostgreSQL ms | PG / SQLite | round trips (PG) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, op in r["operations"].items():
        out.append(
            f"| {name} | {op['sqlite']['median_ms']:.2f} | {op['postgresql']['median_ms']:.2f} | "
            f"{op['ratio']:.2f} | {op['postgresql']['round_trips']:g} |"
        )
    out += [
        "",
        "Figures are medians over all runs of each operation (gc: one run per state). Over a real "
        "network add one round-trip time per round trip; see [SHARED_STORE.md](SHARED_STORE.md).\n",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
