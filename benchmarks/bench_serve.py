"""`kvstore serve` against `mlx_lm.server` (issue 18): same model, same requests, same client, one run.

Both servers run as processes on loopback ports, MLX's matmuls on OpenBLAS in both where it is
installed; the client is the openai SDK, streaming, greedy. Time to first token is measured to
the first streamed content. Three measurements:
- restart: the next turn of a conversation (a ~1,500-token system prompt and one turn) after both
  servers were restarted (ours restores the prefix from its store; theirs keeps its cache in RAM only);
- warm: the next turns without a restart (both have the conversation in RAM; target: ours <= 1.1x),
  three per round, each pair in alternating order;
- agents: 3 agents sharing a 1,500-token system prompt, 5 turns each, both servers restarted once
  after the third round: total prompt tokens prefilled and total request time.
Prints a table, writes benchmarks/results/serve.json, its section of docs/BENCHMARKS.md (through
benchmarks/report.py) and docs/images/serve.png; `--quick` writes only under benchmarks/quick/.

    python -m benchmarks.bench_serve [--model NAME|PATH] [--rounds 3] [--quick]

The model defaults to smollm2-135m-instruct where `resolve_model` knows it, else the built-in
llama "base" model (random weights: speeds are real, replies are not). The concurrent workload
(1, 4 and 8 agents at once, issue 26) is benchmarks/bench_serve_concurrent.py.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvstore  # noqa: E402

kvstore.use_openblas()  # before mlx: the same BLAS as the two servers

import httpx2 as httpx  # noqa: E402  (the HTTP client under the openai SDK)
import openai  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import machine  # noqa: E402

NAME = "serve"  # benchmarks/results/NAME.json, its block of docs/BENCHMARKS.md and docs/images/NAME.png
TARGET_WARM = 1.1
WARM_TURNS = 3  # warm turns measured per round (after the conversation's first turn)
SYSTEM_TOKENS = 1500
MAX_TOKENS = 16
SENTENCES = [
    "The payments service owns the intent state machine and writes every transition to the primary database.",
    "Idempotency keys live in Redis for a day so that a merchant can retry a request without charging twice.",
    "The ledger reconciles with both acquiring banks every night and flags any capture it cannot match.",
    "A canary takes five percent of the traffic for ten minutes before a release reaches every region.",
    "Webhooks are retried with exponential backoff for three days and then parked for manual review.",
]
OPENBLAS = "import kvstore; kvstore.use_openblas(); import sys; "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; `restart()` is stop (SIGTERM) + start on the same store or cache."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name, self.cmd, self.log = name, cmd, log
        self.port = int(cmd[cmd.index("--port") + 1])
        self.proc = None
        self.startups: list[float] = []

    def start(self) -> Server:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        self.startups.append(time.perf_counter() - t0)
        return self

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)


def ask(server: Server, model: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> dict:
    """One streamed, greedy request: its reply, time to first content, total time and token counts."""
    t0 = time.perf_counter()
    first, parts, usage = None, [], None
    stream = server.client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens if details is not None else 0) or 0
    return {
        "text": "".join(parts),
        "ttft": (first or end) - t0,
        "seconds": end - t0,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": cached,
        "prefilled_tokens": usage.prompt_tokens - cached,
        "tokens": usage.completion_tokens,
    }


def system_prompt(tokenizer, n_tokens: int, salt: str) -> str:
    out, i = [], 0
    while len(tokenizer.encode(" ".join(out))) < n_tokens:
        out.append(f"{SENTENCES[i % len(SENTENCES)]} ({salt}{i})")
        i += 1
    return " ".join(out)


def conversation(system: str, turns: list[str], replies: list[str]) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        if i < len(replies):
            msgs.append({"role": "assistant", "content": replies[i]})
    return msgs


def turn_pair(servers: list[Server], model_ids: dict, messages: list[dict], flip: bool) -> dict:
    """The same request to both servers, in alternating order."""
    order = servers[::-1] if flip else servers
    return {s.name: ask(s, model_ids[s.name], messages) for s in order}


def resolve_default_model() -> tuple[str, str]:
    """SmolLM2-135M-Instruct where it is fetched (by name or folder), else the built-in llama base model."""
    from kvstore.agents import ModelLoadError, resolve_model

    folder = Path.home() / ".cache" / "kvstore" / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        try:
            return str(resolve_model("smollm2-135m-instruct").path), "smollm2-135m-instruct"
        except ModelLoadError:
            return str(folder), "smollm2-135m-instruct"
    return builtin_model()


def builtin_model() -> tuple[str, str]:
    """The built-in llama base model (random weights: speeds are real, replies are not): (folder, label)."""
    from kvstore.models.builtin import builtin_model_path

    return str(builtin_model_path(arch="llama", size="base")), "builtin llama base (random weights)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", help="a model folder or name, or `builtin` (default: smollm2-135m-instruct, else builtin base)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round, a 500-token system prompt")
    ap.add_argument("--no-write", action="store_true", help="print only; leave results and plot alone")
    ap.add_argument("--markdown", action="store_true", help="print the docs table of the last results and exit")
    ap.add_argument(
        "--name",
        default=NAME,
        help=f"results name (default {NAME}): benchmarks/results/NAME.json and the NAME block of BENCHMARKS.md "
        "(serve_builtin holds the built-in model's run)",
    )
    args = ap.parse_args()
    if args.markdown:
        published = report.load(args.name)
        print(section(published) if published else f"benchmarks/results/{args.name}.json is missing")
        return
    rounds = 1 if args.quick else args.rounds
    system_tokens = 500 if args.quick else SYSTEM_TOKENS
    if args.model == "builtin":
        path, label = builtin_model()
    elif args.model:
        from kvstore.agents import resolve_model

        path, label = str(resolve_model(args.model).path), args.model
    else:
        path, label = resolve_default_model()
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(Path(path))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ours = Server(
        "kvstore",
        [
            sys.executable,
            "-m",
            "kvstore.server",
            "--model",
            path,
            "--store",
            str(work / "store"),
            "--port",
            str(free_port()),
            "--min-free-disk",
            "0",
            "--log-level",
            "warning",
        ],
        work / "kvstore.log",
    )
    theirs = Server(
        "mlx_lm",
        [
            sys.executable,
            "-c",
            OPENBLAS + "sys.argv[0] = 'mlx_lm.server'; from mlx_lm.server import main; main()",
            "--model",
            path,
            "--port",
            str(free_port()),
            "--max-tokens",
            str(MAX_TOKENS),
            "--log-level",
            "WARNING",
        ],
        work / "mlx_lm.log",
    )
    servers = [ours, theirs]
    model_ids = {"kvstore": path, "mlx_lm": path}
    for s in servers:
        s.start()
    try:
        # Warm both up (first-call compilation) on a throwaway conversation.
        turn_pair(servers, model_ids, conversation("warm up", ["hello"], []), False)
        restart_convs, warm, restart = [], [], []
        for r in range(rounds):
            system = system_prompt(tokenizer, system_tokens, f"r{r}-")
            q = [f"Round {r}: what is the riskiest part of this setup?", "And how would you test it?"]
            a1 = turn_pair(servers, model_ids, conversation(system, q[:1], []), r % 2 == 1)
            restart_convs.append((system, q, {k: v["text"] for k, v in a1.items()}))
            # The same conversation, more turns without a restart: each later turn is a warm pair.
            systemb = system_prompt(tokenizer, system_tokens, f"w{r}-")
            asked, replies = [], {s.name: [] for s in servers}
            for t in range(1 + WARM_TURNS):
                asked.append(f"Round {r}, question {t}: what would you look at next, and why?")
                order = servers if (r + t) % 2 == 0 else servers[::-1]
                pair = {s.name: ask(s, path, conversation(systemb, asked, replies[s.name])) for s in order}
                for name, res in pair.items():
                    replies[name].append(res["text"])
                if t > 0:
                    warm.append(pair)
        for s in servers:
            s.restart()
        for r, (system, q, replies) in enumerate(restart_convs):
            order = ["mlx_lm", "kvstore"] if r % 2 else ["kvstore", "mlx_lm"]
            restart.append(
                {
                    k: ask(next(s for s in servers if s.name == k), path, conversation(system, q, [replies[k]]))
                    for k in order
                }
            )

        # The agent workload: 3 agents, one shared system prompt, 5 turns each, a restart after round 3.
        shared = system_prompt(tokenizer, SYSTEM_TOKENS if not args.quick else 500, "agents-")
        agents = {
            s.name: {k: {"msgs": [{"role": "system", "content": shared + f" You are agent {k}."}]} for k in range(3)}
            for s in servers
        }
        totals = {s.name: {"prefilled_tokens": 0, "prompt_tokens": 0, "seconds": 0.0, "requests": 0} for s in servers}
        for t in range(5):
            if t == 3:
                for s in servers:
                    s.restart()
            for k in range(3):
                for s in servers if (t + k) % 2 == 0 else servers[::-1]:
                    msgs = agents[s.name][k]["msgs"]
                    msgs.append({"role": "user", "content": f"Agent {k}, turn {t}: what do you check next?"})
                    res = ask(s, path, msgs)
                    msgs.append({"role": "assistant", "content": res["text"]})
                    tot = totals[s.name]
                    tot["prefilled_tokens"] += res["prefilled_tokens"]
                    tot["prompt_tokens"] += res["prompt_tokens"]
                    tot["seconds"] += res["seconds"]
                    tot["requests"] += 1
    except BaseException:
        print(f"bench_serve failed; the servers' logs and store are kept in {work}", file=sys.stderr)
        raise
    finally:
        for s in servers:
            s.stop()
    shutil.rmtree(work, ignore_errors=True)  # the store, several hundred MB; kept only when the run failed

    def med(rows, who, key="ttft"):
        return statistics.median(row[who][key] for row in rows)

    def ratio(rows):
        return statistics.median(row["kvstore"]["ttft"] / row["mlx_lm"]["ttft"] for row in rows)

    results = {
        "machine": machine(),
        "model": label,
        "model_path": path,
        "rounds": rounds,
        "system_prompt_tokens": restart[0]["kvstore"]["prompt_tokens"],
        "max_tokens": MAX_TOKENS,
        "restart": {
            "kvstore_ttft": med(restart, "kvstore"),
            "mlx_lm_ttft": med(restart, "mlx_lm"),
            "ratio": ratio(restart),
            "kvstore_cached": restart[0]["kvstore"]["cached_tokens"],
            "mlx_lm_cached": restart[0]["mlx_lm"]["cached_tokens"],
            "prompt_tokens": restart[0]["kvstore"]["prompt_tokens"],
        },
        "warm": {
            "kvstore_ttft": med(warm, "kvstore"),
            "mlx_lm_ttft": med(warm, "mlx_lm"),
            "ratio": ratio(warm),
            "target": TARGET_WARM,
            "kvstore_cached": warm[0]["kvstore"]["cached_tokens"],
            "mlx_lm_cached": warm[0]["mlx_lm"]["cached_tokens"],
            "prompt_tokens": warm[0]["kvstore"]["prompt_tokens"],
        },
        "agents": {k: dict(v, seconds=round(v["seconds"], 3)) for k, v in totals.items()},
        "startup_seconds": {s.name: round(statistics.median(s.startups), 2) for s in servers},
        "same_replies_after_restart": all(r["kvstore"]["text"] == r["mlx_lm"]["text"] for r in restart),
        "raw": {"restart": restart, "warm": warm},
    }
    results["warm"]["meets_target"] = results["warm"]["ratio"] <= TARGET_WARM
    print(f"model: {label}; {rounds} round(s); prompts of ~{results['system_prompt_tokens']} tokens")
    print(f"{'':34}{'kvstore serve':>15}{'mlx_lm.server':>15}{'ratio':>8}")
    for key, title in (("restart", "next turn after a restart: TTFT"), ("warm", "next turn, no restart: TTFT")):
        r = results[key]
        print(f"{title:34}{r['kvstore_ttft'] * 1000:>12.1f} ms{r['mlx_lm_ttft'] * 1000:>12.1f} ms{r['ratio']:>8.2f}")
        print(f"{'  cached prompt tokens':34}{r['kvstore_cached']:>15}{r['mlx_lm_cached']:>15}")
    a = results["agents"]
    print(f"{'agents: tokens prefilled':34}{a['kvstore']['prefilled_tokens']:>15}{a['mlx_lm']['prefilled_tokens']:>15}")
    print(f"{'agents: total request time':34}{a['kvstore']['seconds']:>13.2f} s{a['mlx_lm']['seconds']:>13.2f} s")
    if args.no_write:
        return
    print(section(results))
    report.publish(args.name, results, section(results), quick=args.quick)  # quick: under benchmarks/quick/ only
    image = report.images_dir(args.quick) / f"{args.name}.png"
    plot(results, image)
    print(f"wrote {image.relative_to(report.ROOT)}")


def section(results: dict) -> str:
    """The run's block of docs/BENCHMARKS.md: its machine line and table (also `--markdown`)."""
    m = results["machine"]
    head = (
        f"_{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
        f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']} ({m['device']}); {results['model']}; {results['rounds']} rounds, "
        f"medians; greedy, {results['max_tokens']} new tokens per turn._"
    )
    r, w, a = results["restart"], results["warm"], results["agents"]
    met = "met" if w["meets_target"] else "NOT met"
    rows = [
        "| | kvstore serve | mlx_lm.server | kvstore / mlx_lm |",
        "|---|---:|---:|---:|",
        f"| next turn after both restarted: time to first token | {r['kvstore_ttft'] * 1000:,.0f} ms | "
        f"{r['mlx_lm_ttft'] * 1000:,.0f} ms | {r['ratio']:.2f} |",
        f"| &nbsp;&nbsp;prompt tokens from a cache (of {r['prompt_tokens']:,}) | {r['kvstore_cached']:,} | "
        f"{r['mlx_lm_cached']:,} | |",
        f"| next turn, no restart: time to first token | {w['kvstore_ttft'] * 1000:,.0f} ms | "
        f"{w['mlx_lm_ttft'] * 1000:,.0f} ms | {w['ratio']:.2f} (must be ≤ {w['target']}: {met}) |",
        f"| &nbsp;&nbsp;prompt tokens from a cache (of {w['prompt_tokens']:,}) | {w['kvstore_cached']:,} | "
        f"{w['mlx_lm_cached']:,} | |",
        f"| 3 agents × 5 turns, 1 restart: prompt tokens prefilled | {a['kvstore']['prefilled_tokens']:,} | "
        f"{a['mlx_lm']['prefilled_tokens']:,} | {a['kvstore']['prefilled_tokens'] / a['mlx_lm']['prefilled_tokens']:.2f} |",
        f"| &nbsp;&nbsp;total request time | {a['kvstore']['seconds']:,.1f} s | {a['mlx_lm']['seconds']:,.1f} s | "
        f"{a['kvstore']['seconds'] / a['mlx_lm']['seconds']:.2f} |",
        f"| server start (model load) | {results['startup_seconds']['kvstore']:.1f} s | "
        f"{results['startup_seconds']['mlx_lm']:.1f} s | |",
    ]
    return head + "\n\n" + "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["after a restart", "no restart"]
    ours = [results["restart"]["kvstore_ttft"] * 1000, results["warm"]["kvstore_ttft"] * 1000]
    theirs = [results["restart"]["mlx_lm_ttft"] * 1000, results["warm"]["mlx_lm_ttft"] * 1000]
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], ours, 0.4, label="kvstore serve")
    ax1.bar([i + 0.2 for i in x], theirs, 0.4, label="mlx_lm.server")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("time to first token (ms)")
    ax1.set_title(f"next turn, ~{results['restart']['prompt_tokens']}-token prompt")
    ax1.legend()
    a = results["agents"]
    ax2.bar(
        ["kvstore serve", "mlx_lm.server"],
        [a["kvstore"]["prefilled_tokens"], a["mlx_lm"]["prefilled_tokens"]],
        color=["C0", "C1"],
    )
    ax2.set_ylabel("prompt tokens prefilled")
    ax2.set_title("3 agents x 5 turns, shared system prompt, 1 restart")
    fig.suptitle(f"kvstore serve vs mlx_lm.server — {results['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
