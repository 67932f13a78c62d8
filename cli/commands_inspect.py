"""Read commands: info, agents, show, du (models: commands_models.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from kvstore.records import AgentRecord

from .context import StoreRef, pass_store
from .format import count, emit_json, fields, safe, short_fp, size, table, when

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
SERVE_MARK = "kvstore_serve"  # a server conversation's part of its record (kvstore.server.retention.MARK)


@click.command()
@json_option
@pass_store
def info(ref: StoreRef, as_json: bool) -> None:
    """The store: where it is, its format, counts, bytes on disk, logical bytes and dedup ratio."""
    reader = ref.reader()
    st = reader.stats()
    writes = reader.writes_by_day()
    if as_json:
        emit_json(dict(st.as_dict(), writes_by_day=writes))
        return
    click.echo(
        fields(
            [
                ("store", st.path),
                ("index", st.url),
                ("format", f"{st.format_version} (schema {st.schema_revision})"),
                ("chunk size", f"{st.chunk_size} tokens"),
                ("models", count(st.models)),
                ("agents", count(st.agents)),
                ("snapshots", count(st.snapshots)),
                ("chunks", count(st.chunks)),
                ("blobs", count(st.blobs)),
                ("on disk", f"{size(st.bytes_on_disk)} ({count(st.bytes_on_disk)} bytes)"),
                (
                    "logical",
                    f"{size(st.logical_bytes)} ({count(st.logical_bytes)} bytes, every agent's head stored apart)",
                ),
                ("dedup ratio", _dedup(st.dedup_ratio, st.snapshots, st.agents)),
                ("written", _written(writes)),
            ]
        )
    )


def _written(writes: dict[str, int]) -> str:
    """Blob bytes written today and over the last days the store kept count of (UTC days)."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    week = sum(v for d, v in writes.items() if d >= time.strftime("%Y-%m-%d", time.gmtime(time.time() - 6 * 86400)))
    return f"{size(writes.get(today, 0))} today, {size(week)} in 7 days, {size(sum(writes.values()))} in all (UTC days)"


def _bytes_written(meta: dict) -> int:
    """Blob bytes an agent's saves wrote, from its record: a server conversation's count, else its turns' sum."""
    inner = (meta or {}).get("meta") if isinstance(meta, dict) else None
    mark = inner.get(SERVE_MARK) if isinstance(inner, dict) else None
    if isinstance(mark, dict) and "bytes_written" in mark:
        return int(mark["bytes_written"])
    return sum(int(t.get("bytes_saved") or 0) for t in (meta or {}).get("turns") or [] if isinstance(t, dict))


def _anonymous(meta: dict) -> bool:
    """Whether an agent is an anonymous conversation of `kvstore serve` (no header or key named it)."""
    inner = (meta or {}).get("meta") if isinstance(meta, dict) else None
    mark = inner.get(SERVE_MARK) if isinstance(inner, dict) else None
    return isinstance(mark, dict) and bool(mark.get("anonymous"))


def _dedup(ratio: float, snapshots: int, agents: int) -> str:
    """The ratio, with what it means: below 1 is not negative dedup, it is older snapshots on disk."""
    if ratio >= 1:
        return f"{ratio:.2f}x (the agents' heads stored apart would take {ratio:.2f} times these bytes)"
    old = snapshots - agents
    return (
        f"{ratio:.2f}x (the disk also holds {count(old)} older snapshot(s) that the heads do not "
        "use; `kvstore gc` drops them)"
        if old > 0
        else f"{ratio:.2f}x"
    )


def _printed_json_or_nothing(rows: list[dict], as_json: bool) -> bool:
    """Print the rows as JSON, or say there are no agents; False when a table is still to print."""
    if as_json:
        emit_json(rows)
        return True
    if not rows:
        click.echo("no agents")
        return True
    return False


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also list kvstore serve's anonymous conversations (anon:...).")
@json_option
@pass_store
def agents(ref: StoreRef, show_all: bool, as_json: bool) -> None:
    """One row per agent: model, tokens, snapshots, unique and shared bytes, last saved.

    kvstore serve's anonymous conversations are counted apart; --all lists them too.
    """
    from kvstore.ops import accounting

    store = ref.reader()
    # Two independent reads: the listing runs on a second connection while the byte accounting
    # (most of the time on a big store) runs here.
    with ThreadPoolExecutor(max_workers=1) as pool:
        listing = pool.submit(store.agents)
        nbytes = accounting.agent_bytes(store)
        infos = listing.result()
    names = accounting.model_names(store)
    rows = [
        dict(
            info.as_dict(),
            model_name=names.get(info.model),
            **nbytes.get(info.name, {"unique_bytes": 0, "shared_bytes": 0, "total_bytes": 0}),
        )
        for info in infos
        if show_all or not _anonymous(info.meta)
    ]
    hidden = len(infos) - len(rows)
    if as_json:
        emit_json(rows)
        return
    if hidden:
        click.echo(f"{count(hidden)} anonymous conversation(s) of kvstore serve not listed (--all lists them)")
    if _printed_json_or_nothing(rows, as_json):
        return
    now = time.time()
    click.echo(
        table(
            ["AGENT", "MODEL", "TOKENS", "SNAPSHOTS", "UNIQUE", "SHARED", "LAST SAVED"],
            [
                [
                    r["name"],
                    r["model_name"] or short_fp(r["model"]),
                    count(r["n_tokens"]),
                    r["snapshots"],
                    size(r["unique_bytes"]),
                    size(r["shared_bytes"]),
                    when(r["updated"], now),
                ]
                for r in rows
            ],
            right=(2, 3, 4, 5),
        )
    )


def _names(names: list[str], limit: int = 4) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@click.command()
@click.argument("agent")
@json_option
@pass_store
def show(ref: StoreRef, agent: str, as_json: bool) -> None:
    """An agent: its conversation, its record, its snapshots, and its chunk map (who shares each run of chunks)."""
    from kvstore.ops import accounting

    store = ref.reader()
    info = store.agent(agent)
    snaps = store.snapshots(agent)
    runs = accounting.chunk_runs(store, agent)
    nbytes = accounting.agent_bytes(store, agent)[agent]
    if as_json:
        emit_json(
            {"agent": dict(info.as_dict(), **nbytes), "snapshots": [s.as_dict() for s in snaps], "chunk_map": runs}
        )
        return
    now = time.time()
    model_name = accounting.model_names(store).get(info.model)
    click.echo(
        fields(
            [
                ("agent", info.name),
                ("model", f"{model_name} ({info.model})" if model_name else info.model),
                ("tokens", count(info.n_tokens)),
                (
                    "bytes",
                    f"{size(nbytes['total_bytes'])} ({size(nbytes['unique_bytes'])} unique, "
                    f"{size(nbytes['shared_bytes'])} shared)",
                ),
                ("created", when(info.created, now)),
                ("last saved", when(info.updated, now)),
                ("metadata", ", ".join(sorted(info.meta)) or "-"),
            ]
        )
    )
    conversation = _conversation(info.meta)
    if conversation:
        click.echo("\nconversation")
        for role, content in conversation:
            click.echo(f"[{safe(role)}] " + safe(content, keep="\n\t"))  # a conversation keeps its lines
    click.echo("\nsnapshots")
    click.echo(
        table(
            ["ID", "TOKENS", "CREATED", "LABEL", ""],
            [
                [
                    s.id,
                    count(s.n_tokens),
                    when(s.created, now),
                    s.label or "-",
                    " ".join(w for w, on in (("head", s.id == info.head), ("pinned", s.pinned)) if on),
                ]
                for s in snaps
            ],
            right=(0, 1),
        )
    )
    click.echo("\nchunk map (head snapshot)")
    if not runs:
        click.echo("no chunks")
        return
    click.echo(
        table(
            ["CHUNKS", "TOKENS", "BYTES", "SHARED WITH"],
            [
                [
                    f"{r['first']}-{r['last']}" if r["last"] != r["first"] else str(r["first"]),
                    f"{r['start']}-{r['end']}",
                    size(r["bytes"]),
                    _names(r["shared_with"]),
                ]
                for r in runs
            ],
            right=(2,),
        )
    )


def _conversation(meta: dict) -> list[tuple[str, str]]:
    """(role, text) of an agent manager's record: the system prompt, then each message; [] for other agents."""
    record = AgentRecord.parse(meta)
    if not record.by_manager:
        return []
    out = [("system", record.system_prompt)] if record.system_prompt else []
    for m in record.messages:
        if isinstance(m, dict):
            out.append((str(m.get("role", "?")), str(m.get("content", ""))))
    return out


@click.command()
@click.argument("names", nargs=-1, metavar="[AGENT]...")
@json_option
@pass_store
def du(ref: StoreRef, names: tuple[str, ...], as_json: bool) -> None:
    """Bytes per agent: unique (freed by `rm` + `gc`), shared with other agents, and written by its saves
    (largest first); then the bytes written per UTC day."""
    from kvstore.ops import accounting

    store = ref.reader()
    if names:
        nbytes = {}
        for name in names:
            nbytes.update(accounting.agent_bytes(store, name))
    else:
        nbytes = accounting.agent_bytes(store)
    written = {i.name: _bytes_written(i.meta) for i in (store.agents() if not names else map(store.agent, names))}
    rows: list[dict[str, Any]] = sorted(
        ({"name": n, **b, "bytes_written": written.get(n, 0)} for n, b in nbytes.items()),
        key=lambda r: (-r["total_bytes"], r["name"]),
    )
    if _printed_json_or_nothing(rows, as_json):
        return
    total = {k: sum(r[k] for r in rows) for k in ("unique_bytes", "shared_bytes", "total_bytes")}
    body = [
        [size(r["total_bytes"]), size(r["unique_bytes"]), size(r["shared_bytes"]), size(r["bytes_written"]), r["name"]]
        for r in rows
    ]
    body.append(
        [
            size(total["total_bytes"]),
            size(total["unique_bytes"]),
            size(total["shared_bytes"]),
            size(sum(r["bytes_written"] for r in rows)),
            "(all agents: the logical bytes)",
        ]
    )
    click.echo(table(["TOTAL", "UNIQUE", "SHARED", "WRITTEN", "AGENT"], body, right=(0, 1, 2, 3)))
    if not names:
        click.echo(
            "written per day (UTC): " + (", ".join(f"{d} {size(v)}" for d, v in store.writes_by_day().items()) or "-")
        )


COMMANDS = [info, agents, show, du]
