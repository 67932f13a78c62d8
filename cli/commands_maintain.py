"""Maintenance commands: init, fsck, gc, migrate."""

from __future__ import annotations

import click

from kvstore.formats import MAX_CHUNK_SIZE
from kvstore.index.location import sqlite_url  # a path helper: no engine, no MLX at start-up

from .context import CliError, StoreRef, confirm, pass_store, yes_option
from .format import count, emit_json, fields, progress, size

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
grace_option = click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Leave files younger than this alone (a save may be writing them).",
)


@click.command()
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1, max=MAX_CHUNK_SIZE),
    metavar="TOKENS",
    help="Tokens per chunk for a new store (default 256); fixed once the store exists.",
)
@pass_store
def init(ref: StoreRef, chunk_size: int | None) -> None:
    """Create the store (at --store, $KVSTORE_HOME or ~/.kvstore); an existing one is left as it is."""
    existed = ref.exists()
    store = ref.get(create=True, chunk_size=None if existed else chunk_size)
    if existed and chunk_size is not None and chunk_size != store.chunk_size:
        raise CliError(f"the store at {store.path} already exists with chunk size {store.chunk_size}, not {chunk_size}")
    click.echo(
        f"{'a store already exists' if existed else 'created a store'} at {store.path} "
        f"(chunk size {store.chunk_size} tokens)"
    )


@click.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what can be fixed: drop damaged blobs and their rows (the "
    "agents keep their tokens; their KV is recomputed later), rebuild chunk lists, remove leftovers.",
)
@grace_option
@json_option
@yes_option
@pass_store
def fsck(ref: StoreRef, repair: bool, grace: float, as_json: bool, yes: bool) -> None:
    """Re-hash every blob and check every reference. Exit status 1 while problems remain.

    --repair deletes what is damaged; on a terminal it asks first (--yes skips the question).
    """
    store = ref.get()
    if repair:
        confirm(f"repair {store.path}: delete damaged blobs and dangling rows (agents keep their tokens)?", yes)
    with progress("checking blobs") as cb:
        report = store.fsck(repair=repair, grace=grace, progress=cb)
    if as_json:
        emit_json(dict(report.as_dict(), ok=report.ok))
    else:
        for p in report.problems:
            click.echo(f"{p.kind}: {p.subject}: {p.detail}{' (repaired)' if p.repaired else ''}")
        if report.needs_recompute:
            ids = ", ".join(str(i) for i in report.needs_recompute)
            click.echo(f"snapshots whose KV must be recomputed from their tokens: {ids}")
        left = sum(1 for p in report.problems if not p.repaired)
        verdict = (
            "clean"
            if not report.problems
            else (
                f"{len(report.problems)} problem(s), all repaired"
                if report.ok
                else f"{left} problem(s); run `kvstore fsck --repair`"
                if not repair
                else f"{left} problem(s) left"
            )
        )
        click.echo(
            f"checked {count(report.blobs_checked)} blobs ({size(report.bytes_checked)}) "
            f"in {report.seconds:.1f}s: {verdict}"
        )
    if not report.ok:
        raise click.exceptions.Exit(1)


@click.command()
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@grace_option
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Snapshots kept per agent (besides its head and labelled or pinned ones).",
)
@json_option
@yes_option
@pass_store
def gc(ref: StoreRef, dry_run: bool, grace: float, keep_last: int, as_json: bool, yes: bool) -> None:
    """Remove old snapshots, then chunks and blob files nothing retained needs; print the bytes freed.

    On a terminal it asks first (--yes skips the question; --dry-run changes nothing).
    """
    store = ref.get()
    if not dry_run:
        confirm(
            f"collect garbage in {store.path}: keep the last {keep_last} snapshot(s) per agent "
            "(and labelled or pinned ones), delete the rest?",
            yes,
        )
    with progress("removing blob files") as cb:
        report = store.gc(dry_run=dry_run, keep_last=keep_last, grace=grace, progress=cb)
    if as_json:
        emit_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        fields(
            [
                (f"{verb} snapshots", count(report.snapshots_removed)),
                (f"{verb} chunks", count(report.chunks_removed)),
                (f"{verb} blobs", count(report.blobs_removed)),
                (f"{verb} blob files", count(report.files_removed)),
                (f"{verb} temp files", count(report.temp_removed)),
                (
                    "would free" if dry_run else "freed",
                    f"{size(report.bytes_freed)} ({count(report.bytes_freed)} bytes)",
                ),
                ("took", f"{report.seconds:.1f}s"),
            ]
        )
    )


def _status(ref: StoreRef) -> dict:
    """Schema revision of the index against this kvstore's head, without creating or upgrading anything."""
    from kvstore.index import db, schema

    if not ref.exists():
        return {
            "store": str(ref.root),
            "exists": False,
            "current": None,
            "head": schema.SCHEMA_REVISION,
            "up_to_date": False,
        }
    url = ref.location if ref.is_url else sqlite_url(ref.root, readonly=True)
    engine = db.make_engine(url, readonly=True)
    try:
        status = db.migration_status(engine)
    except Exception as e:
        if isinstance(e, CliError):
            raise
        raise CliError(f"cannot read the schema revision of {ref.location}: {db.translate(e, 'reading it')}") from None
    finally:
        engine.dispose()
    return {"store": ref.location if ref.is_url else str(ref.root), "exists": True, **status}


@click.command()
@click.option(
    "--status", is_flag=True, help="Show the index's schema revision and this kvstore's head; change nothing."
)
@json_option
@pass_store
def migrate(ref: StoreRef, status: bool, as_json: bool) -> None:
    """Upgrade the index schema to this kvstore's version (Alembic), or show where it stands."""
    if status:
        st = _status(ref)
        if as_json:
            emit_json(st)
        elif not st["exists"]:
            click.echo(f"no store at {st['store']} (this kvstore's schema head is {st['head']})")
        else:
            state = "up to date" if st["up_to_date"] else "needs `kvstore migrate`"
            click.echo(f"current {st['current'] or '(none)'}, head {st['head']}: {state}")
        return
    from kvstore.index import db

    if not ref.exists():
        raise CliError(f"no store at {ref.root}: nothing to migrate")
    url = ref.location if ref.is_url else sqlite_url(ref.root)
    engine = db.make_engine(url)
    try:
        done = db.upgrade(engine)  # refuses an index newer than this kvstore (SchemaTooNewError)
    finally:
        engine.dispose()
    if as_json:
        emit_json({"from": done["from"], "to": done["to"], "upgraded": done["from"] != done["to"]})
    elif done["from"] == done["to"]:
        click.echo(f"already at {done['to']}: nothing to do")
    else:
        click.echo(f"upgraded the index from {done['from'] or '(none)'} to {done['to']}")


COMMANDS = [init, fsck, gc, migrate]
