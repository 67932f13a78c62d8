"""Render the per-issue benchmark results (benchmarks/results/*.json) into docs/BENCHMARKS.md.

    python benchmarks/results_report.py

Rewrites the block between `<!-- results:begin -->` and `<!-- results:end -->` from store.json,
agents.json, cli.json and postgres.json, so the page shows exactly what the scripts measured.
A result file that is missing is named as not measured; nothing is filled in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_report import machine_line, replace_block  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _verdict(value: float, limit: float, below: bool = True) -> str:
    ok = value <= limit if below else value >= limit
    return "met" if ok else "**not met**"


STORE_COLUMNS = (("first_save", "first save (durable)"), ("restore_warm", "restore warm"),
                 ("restore_cold", "restore cold"), ("restore_warm_raised", "warm, limit raised"),
                 ("restore_cold_raised", "cold, limit raised"))


def store_section(r: dict) -> list[str]:
    out = ["### Storage engine against mlx-lm's file per agent (`bench_store.py`)\n",
           f"_{machine_line(r['machine'])}; page cache dropped for the cold runs: {r['page_cache_dropped']}; "
           f"{r['sizes'][0]['first_save']['kvstore']['runs']} interleaved rounds per figure (warm restores "
           f"{r['sizes'][0]['restore_warm']['kvstore']['runs']}), medians in ms; ratio = kvstore / mlx-lm"
           + (f"; 1-minute load average {r['load_average'][0]} at the start, {r['load_average'][1]} at the end"
              if r.get("load_average") else "") + "._\n",
           "| shape | tokens | MiB | " + " | ".join(f"{title} | ratio" for _k, title in STORE_COLUMNS) + " |",
           "|---|---:|---:|" + "---:|---:|" * len(STORE_COLUMNS)]
    for s in r["sizes"]:
        cells = []
        for k, _title in STORE_COLUMNS:
            x = s.get(k)
            cells += ([f"{_ms(x['kvstore']['median'])} / {_ms(x['mlx_lm']['median'])}", f"{x['ratio']:.2f}"]
                      if x else ["—", "—"])
        out.append(f"| {s['shape']} | {s['tokens']} | {s['kv_bytes'] / 2**20:.0f} | " + " | ".join(cells) + " |")
    t, sh, k, pk = r["turn_32_on_4096"], r["shared_prefix_8x"], r["chunk_keys"], r["restore_peak_memory"]
    out += ["", "| limit (issues 2 and 15) | measured | must | |", "|---|---:|---:|---|"]
    for name, row in r["summary"].items():
        out.append(f"| {name.replace('_', ' ')} | {row['value']} | ≤ {row['must']} | "
                   f"{'met' if row['met'] else '**not met**'} |")
    out += ["",
            f"A 32-token turn on a 4096-token {t['shape']} agent writes {t['kvstore_bytes'] / 2**20:.1f} MiB in "
            f"{_ms(t['kvstore_s'])} ms; mlx-lm rewrites {t['mlx_lm_bytes'] / 2**20:.0f} MiB in {_ms(t['mlx_lm_s'])} ms. "
            f"Eight agents sharing a 2048-token prefix ({sh['shape']}) take {sh['ratio']:.3f}× their unique KV bytes on "
            f"disk ({sh['vs_mlx_lm']:.2f}× mlx-lm's eight files). Chunk keys for {k['tokens']:,} tokens: {k['ms']} ms. "
            f"Peak memory of a {pk['tokens']}-token {pk['shape']} restore: {pk['kvstore']['ratio_to_cache']}× the "
            f"cache's bytes above the baseline (mlx-lm {pk['mlx_lm']['ratio_to_cache']}×).\n",
            "Where the ratio is above 1: a first save writes one blob per 256-token chunk and makes each "
            "durable (file fsync, then its folder after the rename), then commits the index, where mlx-lm "
            "writes and fsyncs one file: two device flushes in sequence against one, and per-save work "
            "(planning, encoding and hashing before the first write; the SQL statements run beside the "
            "writes) that a small save cannot hide. A restore scatters every blob into the new arrays and "
            "re-hashes it, and looks its chunks up in the index, where mlx-lm reads one file with its I/O "
            "threads and checks nothing.\n",
            _memory_note(r)]
    return out


def _memory_note(r: dict) -> str:
    """The two settings restores ran in, with the page faults each side took in the default one."""
    if "settings" not in r:
        return "This run measured restores in one setting only.\n"
    ours, theirs = ([s["restore_warm"][side]["page_faults"] for s in r["sizes"]] for side in ("kvstore", "mlx_lm"))
    return ("Saves ran in the benchmark's own process, with MLX's defaults. Each size's restores ran in two "
            "fresh processes, both sides side by side in each: one with MLX's defaults, as a user's process "
            "has them (MLX's Linux CPU backend keeps only 32 MiB of freed buffers for reuse, so a larger "
            "restore gets new memory from the kernel every time), and one with MLX's buffer cache limit "
            "raised to its memory limit, MLX's default on macOS, where freed memory is reused. In the default "
            f"setting the warm restores took {min(ours):,} to {max(ours):,} minor page faults a run for kvstore "
            f"and {min(theirs):,} to {max(theirs):,} for mlx-lm; kvstore's large restores advise their "
            "memory into 2 MiB transparent huge pages, one fault per 2 MiB instead of per 4 KiB.\n")


def agents_section(r: dict) -> list[str]:
    w = r["warm_start"]
    out = ["### Agent manager: resume and warm start (`bench_agents.py`)\n",
           f"_{machine_line(r['machine'])}; {r['model']} ({r['model_bytes'] / 2**20:.0f} MiB of parameters, random "
           f"weights); {r['repeat']} interleaved rounds; ms are medians._\n",
           "A new manager asks an agent its next question. *kvstore* restores the agent's cache from the store; "
           "*mlx-lm file* renders the same chat template, loads the agent's `save_prompt_cache` file and trims it; "
           "both prefill the same new tokens with `generate_step` up to the first token. *Cold* prefills everything.\n",
           "| context tokens | prefilled | kvstore | mlx-lm file | cold | kvstore / file | faster than cold |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["resume"]:
        out.append(f"| {x['context_tokens']} | {x['prefilled_tokens']} | {_ms(x['ours']['median'])} | "
                   f"{_ms(x['mlx_file']['median'])} | {_ms(x['cold']['median'])} | {x['ratio_vs_mlx_file']:.2f} "
                   f"({_verdict(x['ratio_vs_mlx_file'], r['targets']['resume_vs_mlx_file'])}) | "
                   f"{x['speedup_vs_cold']:.1f}× |")
    out += ["", f"Warm start of a new agent on another agent's stored {w['preamble_tokens_restored']}-token preamble "
                f"({w['prompt_tokens']}-token prompt): {_ms(w['warm']['median'])} ms to first token against "
                f"{_ms(w['restore']['median'])} ms restore + {_ms(w['prefill_own']['median'])} ms prefill of its own "
                f"tokens: {w['ratio_vs_restore_plus_prefill']:.2f}× (must ≤ {r['targets']['warm_vs_restore_plus_prefill']}, "
                f"{_verdict(w['ratio_vs_restore_plus_prefill'], r['targets']['warm_vs_restore_plus_prefill'])}); "
                f"{w['speedup_vs_cold']:.1f}× faster than its cold start.\n"]
    return out


def _readers(f: dict) -> str:
    """How the disk's read speed was taken: one plain reader, or also as many as fsck uses."""
    many = [k.split("_")[1] for k in f if k.startswith("disk_") and k.endswith("_readers_mb_s")]
    return f"the better of one plain reader and {many[0]} in parallel" if many else "one plain reader"


def cli_section(r: dict) -> list[str]:
    s, q, g, f, lim = r["store"], r["queries"], r["gc"], r["fsck"], r["limits"]
    return ["### The command at scale (`bench_cli.py`)\n",
            f"_{machine_line(r['machine'])}; medians of {q['info']['runs']} runs (min–max)._\n",
            f"Store: {s['agents']:,} agents, {s['snapshots']:,} snapshots, {s['chunks']:,} chunks, "
            f"{s['chunk_layers']:,} layer rows, {s['snapshot_chunks']:,} snapshot-chunk rows; index "
            f"{s['index_bytes'] / 2**30:.1f} GiB.\n",
            "| command | measured | limit | |", "|---|---:|---:|---|",
            f"| `kvstore info --json` | {q['info']['median']:.2f} s ({q['info']['min']:.2f}–{q['info']['max']:.2f}) | "
            f"< {lim['info_s']:g} s | {_verdict(q['info']['median'], lim['info_s'])} |",
            f"| `kvstore agents --json` | {q['agents']['median']:.2f} s ({q['agents']['min']:.2f}–{q['agents']['max']:.2f}) | "
            f"< {lim['agents_s']:g} s | {_verdict(q['agents']['median'], lim['agents_s'])} |",
            f"| `kvstore gc` of {g['unreferenced_blobs']:,} unreferenced blobs | {g['times']['median']:.1f} s "
            f"({g['times']['min']:.1f}–{g['times']['max']:.1f}) | < {lim['gc_100k_s']:g} s | "
            f"{_verdict(g['times']['median'], lim['gc_100k_s'])} |",
            f"| `kvstore fsck` over {f['bytes'] / 2**30:.1f} GiB, page cache dropped | {max(f['fsck_mb_s']):,.0f} MB/s = "
            f"{f['ratio']:.2f}× the disk's cold read ({max(f['disk_mb_s']):,.0f} MB/s, {_readers(f)}) | "
            f"≥ {lim['fsck_vs_disk']:g}× | "
            f"{_verdict(f['ratio'], lim['fsck_vs_disk'], below=False)} |", ""]


def postgres_section(r: dict) -> list[str]:
    s, sv = r["store"], r["server"]
    out = ["### Shared store: PostgreSQL against SQLite (`bench_postgres.py`)\n",
           f"_{machine_line(r['machine'])}; PostgreSQL {sv['version']} over {sv['connection'].split()[0]} loopback, "
           f"fsync {sv['fsync']}, synchronous_commit {sv['synchronous_commit']}; SQLite synchronous=FULL._\n",
           f"The same generated store on both: {s['agents']} agents, {s['snapshots_before_gc']} snapshots, "
           f"{s['chunks']:,} chunks, {s['bytes_on_disk'] / 2**20:.0f} MiB of blobs on the same local disk.\n",
           "| operation | SQLite ms | PostgreSQL ms | PG / SQLite | round trips (PG) |", "|---|---:|---:|---:|---:|"]
    for name, op in r["operations"].items():
        out.append(f"| {name} | {op['sqlite']['median_ms']:.2f} | {op['postgresql']['median_ms']:.2f} | "
                   f"{op['ratio']:.2f} | {op['postgresql']['round_trips']:g} |")
    out += ["", "Figures are medians over all runs of each operation (gc: one run per state). Over a real "
                "network add one round-trip time per round trip; see [SHARED_STORE.md](SHARED_STORE.md).\n"]
    return out


def render() -> str:
    out: list[str] = []
    for name, section in (("store", store_section), ("agents", agents_section), ("cli", cli_section),
                          ("postgres", postgres_section)):
        r = _load(name)
        out += section(r) if r else [f"_`benchmarks/results/{name}.json` is missing: not measured yet._\n"]
    return "\n".join(out)


def main() -> None:
    if not replace_block(DOC, "results", render()):
        raise SystemExit(f"{DOC} has no <!-- results:begin --> / <!-- results:end --> block")
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
