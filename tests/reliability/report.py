"""The figures of a run: each test adds its counts; the session writes them to a file.

A test run must not change tracked files: by default the figures go to `.pytest_cache/kvstore/
reliability.json` (ignored by git). `KVSTORE_PUBLISH_RESULTS=1 pytest tests/reliability` writes the
published `benchmarks/results/reliability.json` instead, the file docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "benchmarks" / "results" / "reliability.json"
LOCAL = ROOT / ".pytest_cache" / "kvstore" / "reliability.json"
PUBLISH_ENV = "KVSTORE_PUBLISH_RESULTS"
_sections: dict[str, dict] = {}


def results_path() -> Path:
    """Where this run's figures go: the published file only when asked for."""
    return PUBLISHED if os.environ.get(PUBLISH_ENV) == "1" else LOCAL


def record(section: str, **counts) -> None:
    """Add (or add to) a section of this run's figures."""
    into = _sections.setdefault(section, {})
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def write(path: Path | None = None) -> Path | None:
    """Merge this run's sections into the results file (sections not run keep their last figures)."""
    if not _sections:
        return None
    path = path or results_path()
    base = path if path.exists() else PUBLISHED
    data = json.loads(base.read_text()) if base.exists() else {}
    stamp = {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.system()} "
        f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
    }
    for name, counts in _sections.items():
        data[name] = {**counts, **stamp}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _sections.clear()
    return path
