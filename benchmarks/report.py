"""Where a benchmark's results go: its JSON, and its own section of docs/BENCHMARKS.md.

Every benchmark owns one block of docs/BENCHMARKS.md between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
and ends its run with

    from benchmarks import report
    report.publish("NAME", results, section_markdown, quick=args.quick)

A full run writes benchmarks/results/NAME.json and rewrites its block in place (a block not there yet is
added at the end of the page). A quick run never touches a published file: it writes the JSON, a copy of
BENCHMARKS.md with its block replaced, and any plots under benchmarks/quick/ (git-ignored).

    python -m benchmarks.report     # re-render every section from benchmarks/results/*.json, measuring nothing
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK = ROOT / "benchmarks" / "quick"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
# The sections python -m benchmarks.report re-renders: block name -> the module whose section() draws it.
SECTIONS = {
    "suite": "benchmarks.benchmark_suite",
    "store": "benchmarks.bench_store",
    "agents": "benchmarks.bench_agents",
    "cli": "benchmarks.bench_cli",
    "postgres": "benchmarks.bench_postgres",
    "real_model": "benchmarks.bench_real_model",
    "serve": "benchmarks.bench_serve",
    "serve_builtin": "benchmarks.bench_serve",  # the same script on the built-in model (--name serve_builtin)
    "objects": "benchmarks.bench_objects",
    "serve_concurrent": "benchmarks.bench_serve_concurrent",
    "growth": "benchmarks.bench_growth",
    "hybrid": "benchmarks.bench_hybrid",
}


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    return f"{seconds * 1e3:,.1f}"


def verdict(value: float, limit: float, below: bool = True) -> str:
    """'met' or a bold 'not met' for a figure against its limit (at most, or with below=False at least)."""
    ok = value <= limit if below else value >= limit
    return "met" if ok else "**not met**"


def output_dir(quick: bool) -> Path:
    """benchmarks/results for a full run, benchmarks/quick (untracked) for a quick one."""
    return QUICK if quick else RESULTS


def images_dir(quick: bool) -> Path:
    """Where plots go: docs/images for a full run, benchmarks/quick/images for a quick one."""
    return QUICK / "images" if quick else ROOT / "docs" / "images"


def results_path(name: str, quick: bool) -> Path:
    return output_dir(quick) / f"{name}.json"


def load(name: str) -> dict | None:
    """The published results of benchmark NAME, or None when it has not been run."""
    path = results_path(name, quick=False)
    return json.loads(path.read_text()) if path.exists() else None


def benchmarks_md(quick: bool) -> Path:
    """The page a run's section goes to; a quick run's copy starts from the published page."""
    if not quick:
        return BENCHMARKS_MD
    copy = QUICK / "BENCHMARKS.md"
    if not copy.exists():
        QUICK.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BENCHMARKS_MD, copy)
    return copy


def replace_block(path: Path, name: str, body: str, append: bool = False) -> bool:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in `path`.

    Without the markers: False, or with append=True a new block at the end of the file.
    """
    if not path.exists():
        return False
    text = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if path.parent != ROOT:  # pages below the top folder link to docs/ pages by their bare names
        body = body.replace("(docs/BENCHMARKS.md)", "(BENCHMARKS.md)")
    if begin not in text or end not in text:
        if not append:
            return False
        path.write_text(f"{text.rstrip()}\n\n{begin}\n{body}\n{end}\n")
        return True
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    return True


def publish(name: str, results: dict, section: str | None, quick: bool) -> list[Path]:
    """Write NAME.json and NAME's block of BENCHMARKS.md (quick: under benchmarks/quick/); the paths written."""
    out = output_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    written = [path]
    if section is not None:
        page = benchmarks_md(quick)
        replace_block(page, name, section, append=True)
        written.append(page)
    where = ", ".join(str(p.relative_to(ROOT)) for p in written)
    print(f"wrote {where}" + (" (a quick run: the published results are untouched)" if quick else ""))
    return written


def main() -> None:
    import importlib

    for name, module in SECTIONS.items():
        results = load(name)
        if results is None:
            print(f"benchmarks/results/{name}.json is missing: {name} not measured yet, its section is left as it is")
            continue
        replace_block(BENCHMARKS_MD, name, importlib.import_module(module).section(results), append=True)
        print(f"rendered {name}")


if __name__ == "__main__":
    main()
