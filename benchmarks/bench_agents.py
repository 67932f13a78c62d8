"""Agent manager benchmark (issue 3): resume and warm-start time to first token, in one run.

On a small built-in model (random weights; speed does not depend on them):
- resume: an agent with a stored conversation of 256..2048 tokens answers its next message in a new
  manager (nothing in memory), against resuming the same cache from an mlx-lm `save_prompt_cache`
  file and against a cold prefill of the whole prompt;
- warm start: a new agent whose prompt begins with another agent's stored 1024-token preamble,
  against (restore of that preamble + prefill of the agent's own tokens) and against a cold prefill.
Prints a table and writes benchmarks/results/agents.json and its section of docs/BENCHMARKS.md (a --quick
run: benchmarks/quick/ instead). Times are medians of `--repeat` runs (warm
page cache); ratios are medians of the ratio within each round, which alternates who goes first, so
other processes slowing a whole round do not skew them.

    python -m benchmarks.bench_agents [--quick] [--arch llama] [--size small] [--model PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import kvstore

kvstore.use_openblas()  # before mlx is imported: MLX's fp32 matmuls on OpenBLAS where installed (Linux)

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import machine, machine_line  # noqa: E402
from benchmarks.timing import paired_ratio, summary  # noqa: E402
from kvstore.agents import AgentManager, resolve_model, turn  # noqa: E402

NAME = "agents"
CONTEXTS = (256, 512, 1024, 2048)
PREAMBLE_TOKENS = 1024
TARGETS = {"resume_vs_mlx_file": 1.1, "warm_vs_restore_plus_prefill": 1.1}
SENTENCES = [
    "The payments service owns the intent state machine and writes every transition to the primary database.",
    "Idempotency keys live in Redis for a day so that a merchant can retry a request without charging twice.",
    "The ledger reconciles with both acquiring banks every night and flags any capture it cannot match.",
    "A canary takes five percent of the traffic for ten minutes before a release reaches every region.",
    "Webhooks are retried with exponential backoff for three days and then parked for manual review.",
    "Enterprise merchants expect a first status update within thirty minutes of a severity one incident.",
]
QUESTION_1 = "Summarise the briefing in one line."
QUESTION_2 = "What are the detailed steps to fix the capture bug?"


def filler(tokenizer, n_tokens: int, salt: str = "") -> str:
    """Text of about n_tokens tokens (whole sentences)."""
    out, i = [], 0
    while len(tokenizer.encode(" ".join(out))) < n_tokens:
        out.append(f"{SENTENCES[i % len(SENTENCES)]} ({salt}{i})")
        i += 1
    return " ".join(out)


def sized_prompt(tokenizer, target: int, salt: str) -> str:
    """A system prompt whose first turn renders to about `target` tokens."""
    render = lambda text: len(
        turn.render(
            tokenizer,
            [
                {"role": "system", "content": text},  # noqa: E731
                {"role": "user", "content": QUESTION_1},
            ],
        )
    )
    words = filler(tokenizer, target, salt)
    while render(words) > target and " " in words:
        words = words.rsplit(" ", 1)[0]
    return words


def first_token(model, cache, prompt: list[int], start: int, step: int) -> None:
    """Prefill prompt[start:-1] into cache and compute the first generated token."""
    turn.prefill(model, cache, prompt, start, len(prompt) - 1, step, None)
    steps = generate_step(mx.array(prompt[-1:]), model, prompt_cache=cache, max_tokens=1)
    next(steps)
    steps.close()


def bench_resume(root: Path, handle, n_ctx: int, repeat: int, cold_repeat: int) -> dict:
    """Resume an agent holding about n_ctx tokens: kvstore vs an mlx-lm cache file vs a cold prefill."""
    store = kvstore.open(root / f"resume-{n_ctx}")
    mgr = AgentManager(handle, store)
    agent = mgr.create("agent", sized_prompt(handle.tokenizer, n_ctx - 8, f"r{n_ctx}-"))
    agent.chat(QUESTION_1, max_tokens=8)
    history = store.tokens("agent")
    cache, _ = store.load("agent", model=handle.fingerprint)
    cache_file = str(root / f"mlx-{n_ctx}.safetensors")
    save_prompt_cache(cache_file, cache, {"tokens": json.dumps(history)})
    messages = agent.conversation(agent.messages + [{"role": "user", "content": QUESTION_2}])
    step = mgr.prefill_step

    phases: dict = {"ours_get": [], "ours_restore": [], "mlx_file_load": []}

    def ours() -> float:
        m = AgentManager(handle, store, autosave=False)  # a new process's manager: nothing resident
        t0 = time.perf_counter()
        a = m.get("agent")
        t_get = time.perf_counter() - t0
        s = a.chat(QUESTION_2, max_tokens=1).stats
        phases["ours_get"].append(t_get)
        phases["ours_restore"].append(s.restore_seconds)  # read, verify and build the cache
        return t_get + s.ttft

    def mlx_file() -> float:
        t0 = time.perf_counter()
        prompt = turn.render(handle.tokenizer, messages)
        c, meta = load_prompt_cache(cache_file, return_metadata=True)
        hist = json.loads(meta["tokens"])
        keep = min(turn.common_prefix(hist, prompt), len(prompt) - 1)
        turn.trim_to(c, len(hist), keep)
        phases["mlx_file_load"].append(time.perf_counter() - t0)  # render + load (lazy: read during prefill)
        first_token(handle.model, c, prompt, keep, step)
        return time.perf_counter() - t0

    def cold() -> float:
        t0 = time.perf_counter()
        prompt = turn.render(handle.tokenizer, messages)
        first_token(handle.model, handle.make_cache(), prompt, 0, step)
        return time.perf_counter() - t0

    prompt = turn.render(handle.tokenizer, messages)
    runs = {"ours": [], "mlx_file": [], "cold": []}
    cpu: dict = {"ours": [], "mlx_file": []}
    for i in range(repeat + 1):  # the first round warms the page cache and MLX's kernels, untimed
        pair = (("ours", ours), ("mlx_file", mlx_file))
        for name, fn in pair if i % 2 else pair[::-1]:  # alternate who goes first
            # An agent and its manager refer to each other, so the last round's manager and its cache
            # wait for the cycle collector: free them now, not inside the next timed call.
            gc.collect()
            c0 = time.process_time()
            t = fn()
            # CPU seconds of the whole call (all threads): the work done, whatever else the machine runs
            c1 = time.process_time() - c0
            if i:
                runs[name].append(t)
                cpu[name].append(c1)
        if i == 0:
            for v in phases.values():
                v.clear()
    # A cold prefill costs seconds to minutes on a CPU; its spread is small next to the ratio it gives.
    runs["cold"] = [cold() for _ in range(cold_repeat)]
    store.close()
    out = {k: summary(v) for k, v in runs.items()}
    o, c = out["ours"]["median"], out["cold"]["median"]
    paired = paired_ratio(runs["ours"], runs["mlx_file"])
    keep = min(turn.common_prefix(history, prompt), len(prompt) - 1)
    return {
        "context_tokens": len(history),
        "prompt_tokens": len(prompt),
        "prefilled_tokens": len(prompt) - keep,
        **out,
        "ratio_vs_mlx_file": paired,
        "ratio_of_minimums": out["ours"]["min"] / out["mlx_file"]["min"],
        "cpu_ratio_vs_mlx_file": paired_ratio(cpu["ours"], cpu["mlx_file"]),
        "phases_median_seconds": {k: statistics.median(v) for k, v in phases.items()},
        "speedup_vs_cold": c / o,
    }


def bench_warm_start(root: Path, handle, repeat: int, cold_repeat: int) -> dict:
    """A new agent on another agent's stored 1024-token preamble: its TTFT against the sum of the parts."""
    store = kvstore.open(root / "warm")
    preamble = filler(handle.tokenizer, PREAMBLE_TOKENS + 32, "w")
    mgr = AgentManager(handle, store)
    mgr.create("base", preamble + "\n\nYour role: the base agent.").chat(QUESTION_1, max_tokens=8)
    step = mgr.prefill_step
    fp = handle.fingerprint

    def prompt_of(i: int) -> list[int]:
        return turn.render(
            handle.tokenizer,
            [
                {
                    "role": "system",
                    "content": preamble + f"\n\nYour role: analyst number {i}, who checks every figure twice.",
                },
                {"role": "user", "content": QUESTION_2},
            ],
        )

    counter = iter(range(10**6))

    def warm() -> tuple[float, int, int]:
        m = AgentManager(handle, store, autosave=False)  # nothing of the new agent gets stored
        i = next(counter)
        agent = m.create(f"new-{i}", preamble + f"\n\nYour role: analyst number {i}, who checks every figure twice.")
        s = agent.chat(QUESTION_2, max_tokens=1).stats
        m.delete(agent.name)
        return s.ttft, s.restored_tokens, s.prompt_tokens

    def parts() -> tuple[float, float]:
        prompt = prompt_of(next(counter))
        t0 = time.perf_counter()
        cache, n = store.restore(prompt, model=fp, max_tokens=len(prompt) - 1)
        t_restore = time.perf_counter() - t0
        t0 = time.perf_counter()
        first_token(handle.model, cache, prompt, n, step)
        return t_restore, time.perf_counter() - t0

    def cold() -> float:
        prompt = prompt_of(next(counter))
        t0 = time.perf_counter()
        first_token(handle.model, handle.make_cache(), prompt, 0, step)
        return time.perf_counter() - t0

    runs: dict = {"warm": [], "restore": [], "prefill_own": [], "cold": []}
    restored = prompt_tokens = 0
    for i in range(repeat + 1):
        gc.collect()  # see bench_resume
        if i % 2:
            w, restored, prompt_tokens = warm()
            gc.collect()
            r, p = parts()
        else:
            r, p = parts()
            gc.collect()
            w, restored, prompt_tokens = warm()
        if i:
            runs["warm"].append(w)
            runs["restore"].append(r)
            runs["prefill_own"].append(p)
    runs["cold"] = [cold() for _ in range(cold_repeat)]
    store.close()
    out = {k: summary(v) for k, v in runs.items()}
    parts_sum = out["restore"]["median"] + out["prefill_own"]["median"]
    paired = statistics.median(w / (r + p) for w, r, p in zip(runs["warm"], runs["restore"], runs["prefill_own"]))
    return {
        "preamble_tokens_restored": restored,
        "prompt_tokens": prompt_tokens,
        **out,
        "restore_plus_prefill": parts_sum,
        "ratio_vs_restore_plus_prefill": paired,
        "speedup_vs_cold": out["cold"]["median"] / out["warm"]["median"],
    }


def ms(x: float) -> str:
    return f"{x * 1000:8.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama", choices=("llama", "gemma3"))
    p.add_argument("--size", default="small")
    p.add_argument("--model", help="a model folder instead of the built-in model")
    p.add_argument("--repeat", type=int, default=21, help="resume rounds (each runs kvstore and the mlx-lm file)")
    p.add_argument("--warm-repeat", type=int, default=7, help="warm-start rounds")
    p.add_argument("--cold-repeat", type=int, default=1, help="cold prefill runs (3 for contexts up to 512 tokens)")
    p.add_argument("--quick", action="store_true", help="contexts 256 and 1024 only, 3 runs")
    p.add_argument("--contexts", help="comma-separated resume contexts (default 256,512,1024,2048)")
    args = p.parse_args(argv)
    contexts = (256, 1024) if args.quick else CONTEXTS
    if args.contexts:
        contexts = tuple(int(x) for x in args.contexts.split(","))
    repeat = 3 if args.quick else args.repeat
    warm_repeat = 3 if args.quick else args.warm_repeat
    if args.model:
        model_path, label = args.model, args.model
    else:
        from kvstore.models.builtin import builtin_model_path

        model_path, label = str(builtin_model_path(arch=args.arch, size=args.size)), f"built-in {args.arch} {args.size}"
    handle = resolve_model(model_path)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvbench-agents-") as tmp:
        root = Path(tmp)
        print(
            f"model: {label} ({handle.nbytes / 2**20:.1f} MB of parameters), chunk size "
            f"{kvstore.DEFAULT_CHUNK_SIZE}, {repeat} resume and {warm_repeat} warm-start rounds, warm page cache"
        )
        print(
            "\nresume time to first token (ms): an agent's next turn in a new manager; 'new' = prompt tokens "
            "prefilled after the restore;\n'vs file' = median of paired round ratios, 'cpu' = the same on CPU "
            "seconds (insensitive to other processes);\n'restore' = kvstore's get + restore (read, verify, build), "
            "'file ld' = render + load_prompt_cache (lazy: its read happens in the prefill)"
        )
        print(
            f"{'context':>8} {'new':>5} {'kvstore':>8} {'mlx file':>8} {'cold':>8} {'vs file':>8} {'min/min':>8} "
            f"{'cpu':>6} {'vs cold':>8} {'restore':>8} {'file ld':>8}"
        )
        resume = []
        for n in contexts:
            r = bench_resume(root, handle, n, repeat, max(3, args.cold_repeat) if n <= 512 else args.cold_repeat)
            resume.append(r)
            ph = r["phases_median_seconds"]
            print(
                f"{r['context_tokens']:>8} {r['prefilled_tokens']:>5} {ms(r['ours']['median'])} "
                f"{ms(r['mlx_file']['median'])} "
                f"{ms(r['cold']['median'])} {r['ratio_vs_mlx_file']:>7.2f}x {r['ratio_of_minimums']:>7.2f}x "
                f"{r['cpu_ratio_vs_mlx_file']:>5.2f}x "
                f"{r['speedup_vs_cold']:>7.1f}x {ms(ph['ours_get'] + ph['ours_restore'])} {ms(ph['mlx_file_load'])}"
            )
        w = bench_warm_start(root, handle, warm_repeat, args.cold_repeat)
        print(
            f"\nwarm start of a new agent on a stored {w['preamble_tokens_restored']}-token preamble "
            f"(prompt {w['prompt_tokens']} tokens), ms:"
        )
        print(
            f"  warm start TTFT {ms(w['warm']['median'])}   restore {ms(w['restore']['median'])} + prefill own "
            f"{ms(w['prefill_own']['median'])} = {ms(w['restore_plus_prefill'])}   cold {ms(w['cold']['median'])}"
        )
        print(
            f"  warm / (restore + prefill) = {w['ratio_vs_restore_plus_prefill']:.2f}x (must be <= "
            f"{TARGETS['warm_vs_restore_plus_prefill']}), cold / warm = {w['speedup_vs_cold']:.1f}x"
        )
    worst = max(r["ratio_vs_mlx_file"] for r in resume)
    passed = (
        worst <= TARGETS["resume_vs_mlx_file"]
        and w["ratio_vs_restore_plus_prefill"] <= TARGETS["warm_vs_restore_plus_prefill"]
    )
    print(
        f"\nworst kvstore / mlx-file resume ratio {worst:.2f}x (must be <= {TARGETS['resume_vs_mlx_file']}): "
        f"{'PASS' if passed else 'FAIL'}   ({time.perf_counter() - t_start:.0f} s)"
    )
    result = {
        "benchmark": "agents",
        "machine": machine(),
        "model": label,
        "model_bytes": handle.nbytes,
        "chunk_size": kvstore.DEFAULT_CHUNK_SIZE,
        "repeat": repeat,
        "warm_repeat": warm_repeat,
        "resume": resume,
        "warm_start": w,
        "targets": TARGETS,
        "worst_resume_ratio": worst,
        "pass": passed,
        "load_average_1m": round(os.getloadavg()[0], 2),  # this machine may be shared: context for the figures
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    report.publish(NAME, {**result, "quick": args.quick}, section(result), quick=args.quick)
    return 0 if passed else 1


def section(r: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md."""
    w = r["warm_start"]
    out = [
        "### Agent manager: resume and warm start (`bench_agents.py`)\n",
        f"_{machine_line(r['machine'])}; {r['model']} ({r['model_bytes'] / 2**20:.0f} MiB of parameters, random "
        f"weights); {r['repeat']} interleaved rounds; ms are medians._\n",
        "A new manager asks an agent its next question. *kvstore* restores the agent's cache from the store; "
        "*mlx-lm file* renders the same chat template, loads the agent's `save_prompt_cache` file and trims it; "
        "both prefill the same new tokens with `generate_step` up to the first token. *Cold* prefills everything.\n",
        "| context tokens | prefilled | kvstore | mlx-lm file | cold | kvstore / file | faster than cold |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["resume"]:
        out.append(
            f"| {x['context_tokens']} | {x['prefilled_tokens']} | {report.fmt_ms(x['ours']['median'])} | "
            f"{report.fmt_ms(x['mlx_file']['median'])} | {report.fmt_ms(x['cold']['median'])} | {x['ratio_vs_mlx_file']:.2f} "
            f"({report.verdict(x['ratio_vs_mlx_file'], r['targets']['resume_vs_mlx_file'])}) | "
            f"{x['speedup_vs_cold']:.1f}× |"
        )
    out += [
        "",
        f"Warm start of a new agent on another agent's stored {w['preamble_tokens_restored']}-token preamble "
        f"({w['prompt_tokens']}-token prompt): {report.fmt_ms(w['warm']['median'])} ms to first token against "
        f"{report.fmt_ms(w['restore']['median'])} ms restore + {report.fmt_ms(w['prefill_own']['median'])} ms prefill of its own "
        f"tokens: {w['ratio_vs_restore_plus_prefill']:.2f}× (must ≤ {r['targets']['warm_vs_restore_plus_prefill']}, "
        f"{report.verdict(w['ratio_vs_restore_plus_prefill'], r['targets']['warm_vs_restore_plus_prefill'])}); "
        f"{w['speedup_vs_cold']:.1f}× faster than its cold start.\n",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
