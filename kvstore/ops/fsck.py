"""fsck: re-hash every blob, check every reference both ways, and optionally repair.

Repair keeps primary data: an agent's snapshots keep their token ids even when the KV of some
chunks has to go; those snapshots are listed in `needs_recompute` (the agent manager re-prefills
them on its next turn), and each one whose restorable prefix got shorter is reported as a repaired
`prefix_shortened` problem that says how many tokens it lost.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from kvstore.blob.local import is_blob_id
from kvstore.cache.keys import chunk_keys, tokens_from_bytes
from kvstore.index import agent_chunks, db, integrity, queries, sizes
from kvstore.index.commit import Chain, ModelRow, Relisted, commit_chain
from kvstore.ops.restorable import Restorable, restorable
from kvstore.records import FsckReport, Problem

if TYPE_CHECKING:
    from kvstore.ops.parts import Checked, Stored


DAMAGED = "damaged_index"  # a row whose values no longer have their types: a damaged page of index.db


def _is_blob_row(blob_id, nbytes) -> bool:
    # Types only: a string that is not a blob id is a crafted or mangled row that _check_blob reports as a
    # corrupt blob (repair drops the row and never builds a path from it); wrong types are a damaged page.
    return isinstance(blob_id, str) and isinstance(nbytes, int)


def _is_fingerprint(f) -> bool:
    return isinstance(f, str) and len(f) == 32 and all(c in "0123456789abcdef" for c in f)


def _hex(key) -> str:
    return bytes(key).hex() if isinstance(key, bytes) else repr(key)


def _check_blob(store: Stored, blob_id: str, nbytes: int, entry) -> tuple[str, str] | None:
    """None if the blob is sound, else (kind, detail). `entry` is its listing (None: not listed)."""
    if not is_blob_id(blob_id):  # a crafted row: never build a path from it (repair drops the row only)
        return "corrupt_blob", f"blob id {blob_id[:80]!r} is not 32 hex digits"
    path = store.blobs.name_of(blob_id)
    size = 0 if entry is None else store.blobs.size(entry)
    if not size:  # not listed (or gone since): a save may have written it after the listing
        st = store.blobs.stat(blob_id)
        if st is None:
            return "missing_blob", f"{path} is missing"
        size = st[0]
    if size != nbytes:
        return "corrupt_blob", f"{path} is {size} bytes, the index says {nbytes}"
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(READ_BUFFER)
    try:
        if not store.blobs.hashes_to_name(blob_id, buf):
            return "corrupt_blob", f"{path} no longer hashes to its name"
    except FileNotFoundError:
        return "missing_blob", f"{path} is missing"
    return None


READ_BUFFER = 4 << 20  # per checking thread, reused for every blob
_buffers = threading.local()


def _check_snapshots(conn, chunk_size: int) -> list[tuple[Problem, int, bytes | None]]:
    """Snapshots whose token ids do not re-derive their chunk list, or whose rows point nowhere."""
    out = []
    fps = {i: f for i, f in integrity.model_fingerprints(conn).items() if _is_fingerprint(f)}
    chunk_lists = integrity.chunk_lists(conn)
    for sid, model_id, n_tokens, tokens in integrity.snapshot_rows(conn):
        if not isinstance(tokens, bytes) or len(tokens) % 4 or not isinstance(n_tokens, int):
            # A damaged page can hold any value in any column; the token ids are primary data, and no
            # repair can invent them (issue 15, item 11: tokens_from_bytes raised TypeError).
            out.append(
                (
                    Problem(
                        DAMAGED,
                        f"snapshot {sid}",
                        "its token ids or token count are unreadable "
                        f"({type(tokens).__name__}); restore index.db from a backup",
                    ),
                    sid,
                    b"",
                )
            )
            continue
        ids = tokens_from_bytes(tokens)
        if model_id not in fps:  # only a damaged index gets here (foreign keys forbid it)
            out.append(
                (Problem("dangling_ref", f"snapshot {sid}", f"names model row {model_id} which is missing"), sid, b"")
            )
            continue
        if len(ids) != n_tokens:
            out.append(
                (
                    Problem(
                        "token_mismatch",
                        f"snapshot {sid}",
                        f"records {n_tokens} tokens but stores {len(ids)} token ids",
                    ),
                    sid,
                    None,
                )
            )
            continue
        keys = chunk_keys(fps[model_id], ids, chunk_size)
        if chunk_lists.get(sid, []) != keys:
            out.append(
                (
                    Problem("token_mismatch", f"snapshot {sid}", "its token ids do not re-derive the chunks it lists"),
                    sid,
                    None,
                )
            )
    for sid, key in integrity.unlisted_chunks(conn):
        name = bytes(key).hex() if isinstance(key, bytes) else repr(key)
        out.append(
            (
                Problem("dangling_ref", f"snapshot {sid}", f"lists chunk {name} which has no row"),
                sid,
                key if isinstance(key, bytes) else None,
            )
        )
    for name, head in integrity.dangling_heads(conn):
        out.append((Problem("dangling_ref", f"agent {name}", f"head snapshot {head} does not exist"), -1, None))
    for name, meta in integrity.agent_metas(conn):
        try:
            json.loads(meta or "{}")
        except ValueError:
            out.append((Problem("damaged_meta", f"agent {name}", "its metadata is not valid JSON"), -1, None))
    return out


def _check_owners(conn, relisted: set[int]) -> list[tuple[Problem, int]]:
    """(problem, agent id) for each agent whose agent_chunks rows disagree with its snapshots' chunk lists.

    Rows that only outlive a damaged chunk list are not reported for the agents in `relisted` (whose lists
    the repair rebuilds from their token ids, and their rows with them)."""
    lacking, stale = integrity.unrecorded_listings(conn), integrity.stale_listings(conn)
    stale = {a: n for a, n in stale.items() if a not in relisted}
    ids = [a for a in {*lacking, *stale} if isinstance(a, int)]
    names = integrity.agent_names(conn, ids)
    out = []
    for agent_id in sorted(ids):
        subject = f"agent {names.get(agent_id, agent_id)}"
        if agent_id in lacking:
            detail = f"agent_chunks lacks {lacking[agent_id]} chunk(s) its snapshots list (a gc would collect them)"
            out.append((Problem("chunk_owners", subject, detail), agent_id))
        if agent_id in stale:
            detail = f"agent_chunks records {stale[agent_id]} chunk(s) none of its snapshots lists"
            out.append((Problem("chunk_owners", subject, detail), agent_id))
    return out


def fsck(store: Checked, repair: bool, grace: float, progress=None) -> FsckReport:
    from kvstore.ops.gc import check_grace, stale_temps

    check_grace(grace)
    t0 = time.perf_counter()
    problems: list[Problem] = []
    with db.transaction(store.engine, write=False, what="checking the index") as conn:
        blob_rows = integrity.blob_rows(conn)
        snap_problems = _check_snapshots(conn, store.chunk_size)
        dangling_layers = integrity.dangling_layers(conn)
        relisted = integrity.snapshot_agents(conn, [sid for p, sid, _ in snap_problems if p.kind == "token_mismatch"])
        owners = _check_owners(conn, relisted)
        try:
            wrong_sizes = sizes.check(conn)
        except (TypeError, ValueError) as e:  # a size column holding text or NULL: damaged, not a crash
            wrong_sizes = []
            problems.append(
                Problem(
                    DAMAGED,
                    "chunk sizes",
                    f"the chunks table holds unreadable sizes ({e}); `kvstore fsck --repair` recomputes them",
                )
            )
            size_damage = True
        else:
            size_damage = False
    unreadable = [(b, n) for b, n in blob_rows if not _is_blob_row(b, n)]
    blob_rows = [(b, n) for b, n in blob_rows if _is_blob_row(b, n)]
    problems += [
        Problem(
            DAMAGED, f"blob row {b!r}", f"its id or size is unreadable (size {n!r}); restore index.db from a backup"
        )
        for b, n in unreadable
    ]
    problems += [p for p, _, _ in snap_problems]
    problems += [
        Problem("dangling_ref", f"chunk {_hex(k)} layer {layer}", f"names blob {b!r} which has no row")
        for k, layer, b in dangling_layers
    ]
    problems += [
        Problem("wrong_size", f"chunk {k.hex()}", f"records {column} = {got}, its blobs make {want}")
        for k, column, got, want in wrong_sizes
    ]
    problems += [p for p, _ in owners]

    bad_blobs: dict[str, Problem] = {}
    total = len(blob_rows)
    done = checked_bytes = 0
    listed = dict(store.blobs.iter_files())  # one listing (a bucket's LIST) serves both directions
    # A blob written after the listing (a save in flight) is looked up again before it counts as missing.
    with ThreadPoolExecutor(max_workers=max(store.io_threads, getattr(store.blobs, "concurrency", 0))) as pool:
        for (blob_id, nbytes), result in zip(
            blob_rows, pool.map(lambda r: _check_blob(store, r[0], r[1], listed.get(r[0])), blob_rows)
        ):
            done += 1
            checked_bytes += int(nbytes)
            if result is not None:
                bad_blobs[blob_id] = Problem(result[0], blob_id, result[1])
            if progress and (done % 256 == 0 or done == total):
                progress(done, total)
    problems += list(bad_blobs.values())

    known = {b for b, _ in blob_rows}
    now = time.time()
    stray = [(b, p) for b, p in listed.items() if b not in known and store.blobs.age(p, now) > grace]
    problems += [
        Problem("orphan_file", store.blobs.describe(p), "a blob file no index row names (a crashed save's leftover)")
        for _, p in stray
    ]
    temps = stale_temps(store.blobs, grace, now)  # a live write's temp file (flock'ed) is not a problem
    problems += [Problem("stale_temp", str(p), "an unfinished write's temp file") for p in temps]

    needs_recompute: set[int] = set()
    if repair and problems:
        needs_recompute, shortened = _repair(
            store,
            bad_blobs,
            [p for p in snap_problems if p[0].kind != DAMAGED],
            dangling_layers,
            stray,
            temps,
            bool(wrong_sizes) or size_damage,
            sorted({a for _, a in owners}),
        )
        # What a damaged page destroyed (token ids, blob rows) stays a problem: no repair can invent it.
        problems = [
            Problem(p.kind, p.subject, p.detail, repaired=p.kind != DAMAGED or p.subject == "chunk sizes")
            for p in problems
        ]
        problems += [_shortened(sid, before, after) for sid, (before, after) in sorted(shortened.items())]
    return FsckReport(
        blobs_checked=total,
        bytes_checked=checked_bytes,
        problems=tuple(problems),
        needs_recompute=tuple(sorted(needs_recompute)),
        repaired=repair,
        seconds=round(time.perf_counter() - t0, 3),
    )


def _shortened(sid: int, before: Restorable, after: Restorable) -> Problem:
    subject = f"agent {after.agent}" + ("" if after.head else f" snapshot {sid}")
    return Problem(
        "prefix_shortened",
        subject,
        f"restorable prefix shortened from {before.tokens} to {after.tokens} of its {after.n_tokens} tokens; "
        "the rest is recomputed on next use",
        repaired=True,
    )


def _repair(
    store, bad_blobs, snap_problems, dangling_layers, stray, temps, wrong_sizes: bool, owners: list[int]
) -> tuple[set[int], dict[int, tuple[Restorable, Restorable]]]:
    """Repair in one write transaction: (snapshots that need recomputing, {snapshot: (restorable before, after)}
    for each whose restorable prefix the dropped KV shortened)."""
    affected: set[int] = set()
    with db.transaction(store.engine, write=True, what="repairing the store") as conn:
        bad_ids = list(bad_blobs)
        lost_chunks = integrity.chunks_of_blobs(conn, bad_ids) if bad_ids else []
        lost_chunks += [k for k, _, _ in dangling_layers if isinstance(k, bytes)]
        affected |= integrity.snapshots_using(conn, lost_chunks)
        # Rebuilt chunk lists (below) are measured by nothing: their old lists did not match their tokens.
        measured = affected - {sid for _, sid, _ in snap_problems}
        before = restorable(conn, measured, store.chunk_size)
        if bad_ids:
            queries.drop_blobs(conn, bad_ids)
        for k, layer, _ in dangling_layers:
            queries.drop_layer(conn, k, layer)
        after = restorable(conn, measured, store.chunk_size)
        shortened = {
            sid: (before[sid], got) for sid, got in after.items() if sid in before and got.tokens < before[sid].tokens
        }
        if wrong_sizes:
            sizes.rebuild(conn)
        else:
            sizes.refresh(conn, lost_chunks)  # their KV is gone: so are its bytes, for them and the chunks after
        fps = integrity.model_fingerprints(conn)
        now = db.now()
        for problem, sid, key in snap_problems:
            if problem.kind == "damaged_meta":  # keep the damaged text where a person can still read it
                queries.keep_damaged_meta(conn, problem.subject[len("agent ") :])
                continue
            if key == b"":
                continue  # no model row: nothing to re-derive chunk keys from
            if problem.subject.startswith("agent "):
                queries.head_to_newest(conn, problem.subject[len("agent ") :])
                continue
            # The token ids are the primary record: rebuild the chunk list from them.
            model_id, raw = integrity.snapshot_tokens(conn, sid)
            toks = np.frombuffer(raw, dtype="<u4")
            keys = chunk_keys(fps[model_id], toks, store.chunk_size)
            relisted = Relisted(snapshot_id=sid, tokens=toks, keys=keys)
            commit_chain(
                conn,
                Chain(model=ModelRow(model_id, fps[model_id]), agent=None, snapshots=[relisted]),
                chunk_size=store.chunk_size,
                now=now,
            )
            affected.add(sid)
        agent_chunks.rebuild(conn, owners)
        for blob_id in filter(is_blob_id, bad_ids):  # files go after their rows, under the same write lock
            store.blobs.remove(blob_id)
        store.blobs.remove_many([b for b, _ in stray])
        for path in temps:
            path.unlink(missing_ok=True)
    return affected, shortened
