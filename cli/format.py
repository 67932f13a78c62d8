"""Output for the `kvstore` command: byte sizes, times, tables, JSON, and progress bars on stderr."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

__all__ = ["safe", "size", "count", "when", "short_fp", "table", "fields", "emit_json", "progress"]


# C0 and C1 controls (ESC starts ANSI sequences; CSI is U+009B), DEL, and the bidirectional
# overrides that reorder what a terminal shows: an imported archive chooses model names and
# metadata keys, and a terminal must show them, not obey them (issue 15, item 9).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: Any, keep: str = "") -> str:
    """`text` for a terminal: control characters shown as escapes (\\x1b, \\u202e), never sent raw.

    `keep` names controls to pass through (a conversation keeps its newlines; a table cell does not).
    """
    return _UNSAFE.sub(
        lambda m: (
            m.group()
            if m.group() in keep
            else f"\\x{ord(m.group()):02x}"
            if ord(m.group()) < 0x100
            else f"\\u{ord(m.group()):04x}"
        ),
        str(text),
    )


def size(n: int | float) -> str:
    """1536 -> '1.5 KiB' (binary units, as `du -h` and Finder's "bytes on disk" use)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def count(n: int) -> str:
    return f"{n:,}"


def when(ts: float | None, now: float | None = None) -> str:
    """A timestamp as local time, with a short age for recent ones ('2025-11-23 07:53 (5m ago)')."""
    if ts is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    age = (now or time.time()) - ts
    if age < 0:
        return stamp
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h"), (86400 * 60, 86400, "d")):
        if age < limit:
            return f"{stamp} ({int(age // div)}{unit} ago)"
    return stamp


def short_fp(fingerprint: str) -> str:
    """The first 12 hex digits of a model fingerprint: enough to tell a store's models apart."""
    return fingerprint[:12]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns listed in `right` are right-aligned (numbers)."""
    cells = [[safe(h) for h in headers]] + [[safe(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in cells)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """'name   value' lines, the names padded to one width; values pass through `safe`."""
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {safe(v)}" for k, v in pairs)


def emit_json(data: Any) -> None:
    """Pretty JSON on stdout: the only thing a `--json` command writes there."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def progress(label: str, unit_bytes: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback for the engine that drives a click progress bar on stderr.

    The bar is made on the first call, when the total is known, and only when stderr is a terminal:
    logs and `--json` pipelines get no progress noise (stdout never carries it either way).
    """
    state: dict[str, Any] = {"bar": None, "done": 0}
    stack = contextlib.ExitStack()

    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        bar = state["bar"]
        if bar is None or bar.length != total:
            if bar is not None:
                stack.close()
            bar = state["bar"] = stack.enter_context(
                click.progressbar(
                    length=max(total, 1), label=label, file=sys.stderr, item_show_func=None, show_pos=not unit_bytes
                )
            )
            state["done"] = 0
        step = done - state["done"]
        if step > 0:
            bar.update(step)
            state["done"] = done

    with stack:
        yield update
