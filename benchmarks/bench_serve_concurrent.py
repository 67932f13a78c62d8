"""Many agents at once (issue 26): `kvstore serve` against `mlx_lm.server` with concurrent clients.

The concurrent workload of bench_serve: N agents (1, 4, 8), each with its own system prompt that
shares a long preamble, ask their two turns all at once (openai SDK, streaming, greedy); then the
same with both servers restarted between the turns. Both servers with their defaults (mlx_lm.server
batches with its --decode-concurrency / --prompt-concurrency defaults, kvstore serve with its
--max-concurrency default), OpenBLAS loaded in both (`kvstore.use_openblas()`, the library kvstore
loads), run one after the other on fresh conversations. Measured: wall time of the turns (server
restarts excluded), median and p95 time to first token, generated tokens per second.
Writes benchmarks/results/serve_concurrent.json, its block of docs/BENCHMARKS.md and
docs/images/serve_concurrent.png; `--quick` (a shorter preamble, fewer tokens) writes under benchmarks/quick/.

    python -m benchmarks.bench_serve_concurrent [--model NAME|PATH] [--agents 1,4,8] [--quick]
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

from benchmarks import report  # noqa: E402
from benchmarks.bench_serve import (  # noqa: E402  (it loads OpenBLAS before mlx)
    OPENBLAS,
    Server,
    ask,
    free_port,
    resolve_default_model,
    system_prompt,
)
from benchmarks.common import machine  # noqa: E402

NAME = "serve_concurrent"
PREAMBLE_TOKENS = 1000
MAX_TOKENS = 32
TURNS = 2
MUST = {"wall": 0.8, "ttft": 1.0, "restart_wall": 0.5}  # issue 26, at 8 agents


def workload(server: Server, model: str, systems: list[str], max_tokens: int, restart: bool) -> dict:
    """Every agent's turns, all agents at once per turn; with `restart`, the server restarts between turns."""
    n = len(systems)
    convs = [[{"role": "system", "content": s}] for s in systems]
    rows, wall = [], 0.0
    for t in range(TURNS):
        if restart and t > 0:
            server.restart()
        for k, msgs in enumerate(convs):
            msgs.append({"role": "user", "content": f"Agent {k}, turn {t}: what is the riskiest part, and why?"})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda msgs: ask(server, model, msgs, max_tokens), convs))
        wall += time.perf_counter() - t0
        for msgs, res in zip(convs, got):
            msgs.append({"role": "assistant", "content": res["text"]})
        rows += got
    ttfts = sorted(r["ttft"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {
        "wall": round(wall, 3),
        "ttft_median": round(statistics.median(ttfts), 4),
        "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 4),
        "tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "replies": [r["text"] for r in rows],
    }


def load_average() -> list[float]:
    try:
        return [round(float(x), 2) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model folder or name (default: smollm2-135m-instruct, else builtin base)")
    ap.add_argument("--agents", default="1,4,8", help="concurrency levels (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="a 300-token preamble, 16 tokens per turn")
    args = ap.parse_args()
    if args.model:
        from kvstore.agents import resolve_model

        path, label = str(resolve_model(args.model).path), args.model
    else:
        path, label = resolve_default_model()
    levels = [int(x) for x in args.agents.split(",")]
    preamble_tokens = 300 if args.quick else PREAMBLE_TOKENS
    max_tokens = 16 if args.quick else MAX_TOKENS
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(Path(path))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-concurrent-"))
    ours = Server(
        "kvstore",
        [sys.executable, "-m", "kvstore.server", "--model", path, "--store", str(work / "store")]
        + ["--port", str(free_port()), "--min-free-disk", "0", "--log-level", "warning"],
        work / "kvstore.log",
    )
    theirs = Server(
        "mlx_lm",
        [sys.executable, "-c", OPENBLAS + "sys.argv[0] = 'mlx_lm.server'; from mlx_lm.server import main; main()"]
        + ["--model", path, "--port", str(free_port()), "--log-level", "WARNING"],
        work / "mlx_lm.log",
    )
    servers = [ours, theirs]
    load_before = load_average()
    runs: dict = {}
    for s in servers:
        s.start()
    try:
        for s in servers:  # warm up (first-call compilation)
            ask(s, path, [{"role": "user", "content": "hello"}], 4)
        for i, n in enumerate(levels):
            for restart in (False, True):
                key = f"{n}{'_restart' if restart else ''}"
                preamble = system_prompt(tokenizer, preamble_tokens, f"{key}-")
                systems = [preamble + f" You are agent {k} of {n}: answer as that specialist." for k in range(n)]
                order = servers if i % 2 == 0 else servers[::-1]
                runs[key] = {s.name: workload(s, path, systems, max_tokens, restart) for s in order}
                r = runs[key]
                print(
                    f"{n} agents{' + restart' if restart else ''}: wall {r['kvstore']['wall']:.1f} s vs "
                    f"{r['mlx_lm']['wall']:.1f} s; median TTFT {r['kvstore']['ttft_median']:.2f} s vs "
                    f"{r['mlx_lm']['ttft_median']:.2f} s",
                    flush=True,
                )
    except BaseException:
        print(f"bench_serve_concurrent failed; logs and store kept in {work}", file=sys.stderr)
        raise
    finally:
        for s in servers:
            s.stop()
    shutil.rmtree(work, ignore_errors=True)
    results = {
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "model": label,
        "preamble_tokens": preamble_tokens,
        "max_tokens": max_tokens,
        "turns": TURNS,
        "levels": levels,
        "runs": runs,
        "same_replies": {k: v["kvstore"]["replies"] == v["mlx_lm"]["replies"] for k, v in runs.items()},
    }
    print(section(results))
    report.publish(NAME, results, section(results), quick=args.quick)
    image = report.images_dir(args.quick) / f"{NAME}.png"
    plot(results, image)
    print(f"wrote {image.relative_to(report.ROOT)}")


def ratios(results: dict, key: str) -> dict:
    r = results["runs"][key]
    return {m: r["kvstore"][m] / r["mlx_lm"][m] for m in ("wall", "ttft_median", "ttft_p95")}


def section(results: dict) -> str:
    """The block of docs/BENCHMARKS.md: machine line, load, one row per level and variant, the Must."""
    m = results["machine"]
    load = results["load_average"]
    head = (
        f"_{m['cpu']}, {m['cores']} cores, {m['os']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']} ({m['device']}); "
        f"{results['model']}; every agent's system prompt shares a ~{results['preamble_tokens']:,}-token preamble; "
        f"{results['turns']} turns, all agents at once per turn, greedy, {results['max_tokens']} new tokens per "
        f"turn; load average before/after {load['before']} / {load['after']} (a shared machine)._"
    )
    rows = [
        "| agents | restart between turns | wall: kvstore / mlx_lm | median TTFT | p95 TTFT | tokens/s |",
        "|---:|:---:|---:|---:|---:|---:|",
    ]
    for key, r in results["runs"].items():
        a, b = r["kvstore"], r["mlx_lm"]
        rows.append(
            f"| {key.split('_')[0]} | {'yes' if key.endswith('restart') else 'no'} | "
            f"{a['wall']:.1f} s / {b['wall']:.1f} s ({a['wall'] / b['wall']:.2f}) | "
            f"{a['ttft_median']:.2f} s / {b['ttft_median']:.2f} s ({a['ttft_median'] / b['ttft_median']:.2f}) | "
            f"{a['ttft_p95']:.2f} s / {b['ttft_p95']:.2f} s | {a['tokens_per_second']:.1f} / {b['tokens_per_second']:.1f} |"
        )
    out = head + "\n\n" + "\n".join(rows)
    top = max(results["levels"])
    if f"{top}" in results["runs"] and f"{top}_restart" in results["runs"]:
        warm, cold = ratios(results, f"{top}"), ratios(results, f"{top}_restart")
        out += (
            f"\n\nIssue 26's Must at {top} agents: wall {warm['wall']:.2f}x (≤ {MUST['wall']}: "
            f"{report.verdict(warm['wall'], MUST['wall'])}), median TTFT {warm['ttft_median']:.2f}x "
            f"(≤ {MUST['ttft']}: {report.verdict(warm['ttft_median'], MUST['ttft'])}), with a restart between "
            f"the turns wall {cold['wall']:.2f}x (≤ {MUST['restart_wall']}: "
            f"{report.verdict(cold['wall'], MUST['restart_wall'])})."
        )
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    levels = results["levels"]
    for server, color in (("kvstore", "C0"), ("mlx_lm", "C1")):
        for suffix, style in (("", "-"), ("_restart", "--")):
            runs = [results["runs"][f"{n}{suffix}"][server] for n in levels]
            label = f"{'kvstore serve' if server == 'kvstore' else 'mlx_lm.server'}{' (restart)' if suffix else ''}"
            ax1.plot(levels, [r["tokens_per_second"] for r in runs], style, color=color, marker="o", label=label)
            ax2.plot(levels, [r["ttft_median"] for r in runs], style, color=color, marker="o", label=label)
    ax1.set_xlabel("concurrent agents")
    ax1.set_ylabel("generated tokens / s")
    ax2.set_xlabel("concurrent agents")
    ax2.set_ylabel("median time to first token (s)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"many agents at once — {results['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
