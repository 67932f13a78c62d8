"""Blobs on S3 (issue 19): restore from a loopback SeaweedFS, from the local disk tier and from a local store,
against mlx-lm's one-file load; the first save and a 32-token turn on S3; and the server's own limit.

For each model shape (4,096 tokens of synthetic bf16 KV in Qwen2.5-0.5B's and Llama-3-8B's shapes):

- restore from S3: `store.load` with an empty disk tier (every blob is fetched, concurrently, and verified);
- restore from the tier: the same load again (the blobs are local files; no request is made);
- restore from a local store: the same cache saved in a folder store (index and blobs on local disk);
- mlx-lm: `load_prompt_cache` of the same cache written by `save_prompt_cache` (one safetensors file);
- the limit: a plain loop of concurrent GETs (obstore, 16 threads) of the very objects the restore reads,
  nothing else done with the bytes; and boto3's (16 threads) where it is installed, for the client choice.

Local reads are from the page cache (the files were just written), as in a restore soon after a save.
Prints a table, writes benchmarks/results/objects.json and the objects section of docs/BENCHMARKS.md
(through benchmarks/report.py). `--quick` (one small shape, fewer runs) writes only under benchmarks/quick/.

    python -m benchmarks.bench_objects [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import kvstore
from benchmarks import report
from benchmarks.common import machine, touch_memory
from benchmarks.timing import timed, timed_pair
from kvstore.testing import SHAPES, extend, kv_bytes
from kvstore.testing import model_cache as synthetic_cache

HERE = Path(__file__).resolve().parent


def _load_seaweedfs():
    """.ci/seaweedfs.py (the CI's SeaweedFS launcher) as a module: .ci is not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seaweedfs", HERE.parent / ".ci" / "seaweedfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seaweedfs"] = module
    spec.loader.exec_module(module)
    return module


seaweedfs = _load_seaweedfs()
SeaweedFS = seaweedfs.SeaweedFS

NAME = "objects"  # benchmarks/results/objects.json and its block of docs/BENCHMARKS.md
GET_THREADS = 16


def _fp(shape: str) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(shape.encode())


def _empty_tier(store) -> None:
    from kvstore.blob import scatter

    root = store.blobs.tier.root
    shutil.rmtree(root)
    root.mkdir()
    store.blobs.tier._bytes = 0
    scatter._VERIFIED.clear()  # as a new process would: no header is known yet


def _forget_headers() -> None:
    from kvstore.blob import scatter

    scatter._VERIFIED.clear()


def _get_loop_obstore(store, keys: list[str]) -> int:
    import obstore as obs

    with ThreadPoolExecutor(GET_THREADS) as pool:
        return sum(pool.map(lambda k: len(obs.get(store.blobs.client, k).bytes()), keys))


def _boto3_client(server: SeaweedFS):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    env = server.env()
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(max_pool_connections=GET_THREADS * 2),
    )


def _get_loop_boto3(client, bucket: str, keys: list[str]) -> int:
    with ThreadPoolExecutor(GET_THREADS) as pool:
        return sum(pool.map(lambda k: len(client.get_object(Bucket=bucket, Key=k)["Body"].read()), keys))


def bench_shape(shape: str, n: int, server: SeaweedFS, work: Path, repeat: int) -> dict:
    fp = _fp(shape)
    nbytes = kv_bytes(shape, n)
    tokens = list(range(n))
    out: dict = {"shape": shape, "layers_heads_dim": SHAPES[shape], "tokens": n, "kv_bytes": nbytes}

    with kvstore.open(
        work / f"{shape}-s3", blobs=server.url(shape), cache_dir=work / f"{shape}-tier", cache_size=4 << 30
    ) as s3:
        s3.save(
            "warm-up", synthetic_cache(shape, 256, seed=99), list(range(10**6, 10**6 + 256)), model=fp
        )  # connections, imports
        firsts, turns = [], []
        for i in range(repeat):  # a cache of its own each time: every blob is new to the bucket
            cache = synthetic_cache(shape, n, seed=10 + i)
            own = [10**7 * (i + 1) + j for j in range(n)]  # tokens of its own too: no chunk key is known
            t0 = time.perf_counter()
            snap = s3.save(f"first-{i}", cache, own, model=fp)
            firsts.append(time.perf_counter() - t0)
            extend(cache, 32, seed=100 + i)
            t0 = time.perf_counter()
            turn = s3.save(f"first-{i}", cache, own + list(range(n, n + 32)), model=fp)
            turns.append(time.perf_counter() - t0)
            cache = None
        out["s3_first_save_s"], out["s3_turn_save_s"] = statistics.median(firsts), statistics.median(turns)
        out["s3_first_save_blobs"], out["s3_turn_save_bytes"] = snap.blobs_written, turn.bytes_written
        s3.save("b", synthetic_cache(shape, n), tokens, model=fp)  # the restore reads "b": n tokens exactly

        with s3.engine.connect() as conn:
            from sqlalchemy import text

            wanted = sorted(
                r[0]
                for r in conn.execute(
                    text(
                        "SELECT DISTINCT cl.blob_id FROM chunk_layers cl JOIN snapshot_chunks sc "
                        "ON sc.chunk_key = cl.chunk_key JOIN snapshots s ON s.id = sc.snapshot_id "
                        "JOIN agents a ON a.head = s.id WHERE a.name = 'b'"
                    )
                )
            )
        keys = [s3.blobs.key(b) for b in wanted]
        got_bytes = [0]

        def get_loop():
            got_bytes[0] = _get_loop_obstore(s3, keys)

        # Alternating rounds (common.timed_pair): both see the same background load and recycled memory.
        out["restore_s3"], out["get_loop_obstore"] = timed_pair(
            lambda: s3.load("b", model=fp), get_loop, repeat, before=lambda: _empty_tier(s3)
        )
        out["get_loop_bytes"] = got_bytes[0]
        with kvstore.open(work / f"{shape}-local") as local:
            ref, _t = s3.load("b", model=fp)
            local.save("b", ref, tokens, model=fp)
            out["restore_tier"], out["restore_local"] = timed_pair(
                lambda: s3.load("b", model=fp), lambda: local.load("b", model=fp), repeat, before=_forget_headers
            )
        # The write side's limit: the same objects PUT again under another prefix, as many at once as a
        # save writes (the store's I/O threads).
        bodies = [s3.blobs.tier.path(b).read_bytes() for b in wanted]
        rounds = iter(range(1000))

        def put_loop():
            import obstore as obs

            r = next(rounds)
            with ThreadPoolExecutor(s3.io_threads) as pool:
                list(
                    pool.map(
                        lambda kb: obs.put(
                            s3.blobs.client, f"put-loop/{shape}/{r}/{kb[0]}", kb[1], use_multipart=False
                        ),
                        enumerate(bodies),
                    )
                )

        out["put_loop"] = timed(put_loop, repeat)
        out["put_loop_bytes"] = sum(len(b) for b in bodies)
        bodies = None
        client = _boto3_client(server)
        if client is not None:
            out["get_loop_boto3"] = timed(lambda: _get_loop_boto3(client, server.bucket, keys), repeat)
    path = work / f"{shape}.safetensors"
    save_prompt_cache(str(path), ref)
    ref = None

    def mlx_load():
        c = load_prompt_cache(str(path))
        mx.eval([a for layer in c for a in (layer.keys, layer.values)])

    out["restore_mlx_lm"] = timed(mlx_load, repeat)
    return out


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(
        f"_{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}; SeaweedFS {results['seaweedfs']} (`weed server -s3`) on loopback "
        "on the same 2 cores; index in SQLite; obstore client, "
        f"{GET_THREADS} GETs in flight; load average {results['load_before']} before the run._\n"
    )
    lines.append(
        "| shape | tokens | KV | restore from S3 | from the disk tier | from a local store | "
        "mlx-lm one file | plain GET loop (the limit) | S3 restore / GET loop | boto3 GET loop |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["shapes"]:
        n = r["kv_bytes"]
        cells = []
        for key in ("restore_s3", "restore_tier", "restore_local", "restore_mlx_lm", "get_loop_obstore"):
            t = r[key]["median"]
            cells.append(f"{t * 1000:,.0f} ms ({_mbps(n, t):,.0f} MB/s)")
        ratio = r["get_loop_obstore"]["median"] / r["restore_s3"]["median"]
        boto = r.get("get_loop_boto3")
        boto_cell = f"{boto['median'] * 1000:,.0f} ms ({_mbps(n, boto['median']):,.0f} MB/s)" if boto else "—"
        lines.append(
            f"| {r['shape']} | {r['tokens']:,} | {n / 2**20:,.0f} MiB | "
            + " | ".join(cells)
            + f" | {ratio:.2f} | {boto_cell} |"
        )
    lines.append("")
    lines.append(
        "| shape | first save on S3 | plain PUT loop (the limit) | 32-token turn on S3 | tier / S3 restore | "
        "local store / tier | mlx-lm / S3 restore |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["shapes"]:
        n = r["kv_bytes"]
        lines.append(
            f"| {r['shape']} | {r['s3_first_save_s'] * 1000:,.0f} ms ({_mbps(n, r['s3_first_save_s']):,.0f} MB/s, "
            f"{r['s3_first_save_blobs']} objects) | {r['put_loop']['median'] * 1000:,.0f} ms "
            f"({_mbps(r['put_loop_bytes'], r['put_loop']['median']):,.0f} MB/s) | {r['s3_turn_save_s'] * 1000:,.0f} ms "
            f"({r['s3_turn_save_bytes'] / 2**10:,.0f} KiB written) | "
            f"{r['restore_tier']['median'] / r['restore_s3']['median']:.2f} | "
            f"{r['restore_local']['median'] / r['restore_tier']['median']:.2f} | "
            f"{r['restore_mlx_lm']['median'] / r['restore_s3']['median']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Medians of {results['repeat']} runs (MB/s = KV bytes / seconds; the PUT "
        'loop: object bytes / seconds, 4 PUTs in flight as in a save). "S3 restore / GET loop" is '
        "the share of the server's own delivery rate that a restore reaches (1.00 = bounded by the "
        "server, not by the engine). A ratio below 1 in the second table means the left side is faster."
    )
    return "\n".join(lines) + "\n"


def section(results: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md (python -m benchmarks.report re-renders it from the JSON)."""
    return f"### Blobs on S3 (`bench_objects.py`)\n\n{table(results)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="one small shape, 2 runs; results under benchmarks/quick/ only"
    )
    ap.add_argument("--repeat", type=int, default=None)
    a = ap.parse_args()
    repeat = a.repeat or (2 if a.quick else 3)
    shapes = [("qwen2.5-0.5b", 1024)] if a.quick else [("qwen2.5-0.5b", 4096), ("llama-3-8b", 4096)]
    touch_memory(2.0 if a.quick else 6.0)  # fresh VM pages cost more than reused ones: back them first
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-objects-") as tmp:
        work = Path(tmp)
        import os
        import subprocess

        server = SeaweedFS(work / "weed")
        os.environ.update(server.env())
        with server:
            version = subprocess.run(
                [seaweedfs.weed_binary(), "version"], capture_output=True, text=True
            ).stdout.split()[2]
            results = {
                "machine": machine(),
                "seaweedfs": version,
                "load_before": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
                "repeat": repeat,
                "quick": a.quick,
                "shapes": [bench_shape(s, n, server, work, repeat) for s, n in shapes],
            }
    print(table(results))
    report.publish(NAME, results, section(results), quick=a.quick)  # quick: under benchmarks/quick/ only
    return 0


if __name__ == "__main__":
    sys.exit(main())
