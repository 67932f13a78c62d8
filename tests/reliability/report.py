"""The figures of a run: each test adds its counts; the session writes benchmarks/results/reliability.json."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "reliability.json"
_sections: dict[str, dict] = {}


def record(section: str, **counts) -> None:
    """Add (or add to) a section of this run's figures."""
    into = _sections.setdefault(section, {})
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def write() -> Path | None:
    """Merge this run's sections into the results file (sections not run keep their last figures)."""
    if not _sections:
        return None
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.system()} "
             f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"}
    for name, counts in _sections.items():
        data[name] = {**counts, **stamp}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _sections.clear()
    return RESULTS
