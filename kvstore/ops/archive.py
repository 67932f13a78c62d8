"""Moving one agent between stores: a self-contained archive, verified in full before anything is written.

An archive is an uncompressed tar (blobs are already dense; a tar streams and can be inspected with
`tar tvf`). Its first member, `manifest.json`, holds the agent's record, its model's fingerprint and
cache layout, every snapshot's token ids and chunk list, the chunk rows, the (chunk, layer) -> blob
rows, and every blob's id and size. Then one member per blob, `blobs/<id>.safetensors`.

Import checks everything before it writes anything: the tar's raw headers (archive_tar), the
manifest's shape and cache layout (archive_manifest), each snapshot's chunk keys re-derived from its
tokens, each layer row against the blob's own header, and every blob's bytes against its id. A
damaged or edited archive raises ArchiveError and leaves the target store exactly as it was.

None of that proves the KV was computed from the token ids (issue 15, item 1). So by default an
import is kept apart: its chunks go in under a namespace of their own, a fingerprint derived from
the model's and the archive's manifest, and no local save or restore ever meets them; the imported
agent still loads and continues under the real model's fingerprint. `trust=True` merges them with
the store's own chunks as they are; `verify=model` merges them once every chunk recomputed with the
model matches (archive_verify).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import xxhash

from kvstore.blob.tensorfile import HEADER_PROBE, parse_header
from kvstore.cache.keys import chunk_keys
from kvstore.errors import AgentExistsError, CorruptBlobError, ModelMismatchError, ReadOnlyStoreError, StoreError
from kvstore.index import db, queries
from kvstore.index.commit import AgentEntry, Chain, LayerRow, ModelEntry, Retry, commit_chain, retrying
from kvstore.names import validate_name
from kvstore.ops.archive_export import KEPT_APART, ArchiveSummary, export_agent
from kvstore.ops.archive_manifest import ARCHIVE_VERSION, ArchivePlan, check_manifest
from kvstore.ops.archive_tar import bad, manifest_bytes, open_archive, parse_manifest, read_member
from kvstore.ops.archive_tar import members as tar_members

if TYPE_CHECKING:
    from kvstore.ops.parts import Importer, Stored

__all__ = ["export_agent", "import_agent", "read_manifest", "ArchiveSummary", "ARCHIVE_VERSION"]

READ_SIZE = 1 << 20
ATTEMPTS = 3
Progress = Callable[[int, int], None] | None


# -- reading and checking an archive ---------------------------------------------------------------


def _check_blob(
    tar: tarfile.TarFile, member: tarfile.TarInfo, blob_id: str, nbytes: int, plan: ArchivePlan, uses: list[LayerRow]
) -> None:
    """The blob's bytes hash to its id, and its own header agrees with the layer rows naming it."""
    if member.size != nbytes:  # before a byte is read: the member is bounded by the manifest
        raise bad(f"blob {blob_id} is {member.size} bytes, the manifest says {nbytes}")
    h = xxhash.xxh3_128()
    f = tar.extractfile(member)
    head = b""
    while True:
        piece = f.read(READ_SIZE)
        if not piece:
            break
        if len(head) < HEADER_PROBE:
            head += piece[: HEADER_PROBE - len(head)]
        h.update(piece)
    if h.hexdigest() != blob_id:
        raise bad(f"blob {blob_id}'s bytes do not match its hash")
    if len(head) < nbytes and len(head) >= 8 and 8 + int.from_bytes(head[:8], "little") > len(head):
        f.seek(0)
        head = f.read(min(nbytes, 8 + int.from_bytes(head[:8], "little")))
    try:
        _base, header, meta = parse_header(head, blob_id)
    except (CorruptBlobError, RecursionError):
        raise bad(f"blob {blob_id} is not a kvstore blob") from None
    if not isinstance(meta, dict) or meta.get("model") != plan.fingerprint:
        raise bad(f"blob {blob_id} was made by another model than {plan.fingerprint}")
    for row in uses:
        layer, length = row.layer, plan.chunks[row.chunk_key][1]
        slot = plan.slots[layer]
        if meta.get("kind") == "state":
            ok = meta.get("slot") == str(layer) and slot.kind == "state" and set(header) <= _state_names(slot)
        else:
            mine = {
                tname.split(".", 1)[1]: info
                for tname, info in header.items()
                if tname.split(".", 1)[0] == str(layer) and "." in tname
            }
            shapes = [info.get("shape") if isinstance(info, dict) else None for info in mine.values()]
            # The tensors a load builds this slot's class from, and no others (a layout naming another
            # class than the blobs hold made loads raise KeyError: issue 15, item 6).
            want = {f"{kv}{i}" for kv in "kv" for i in range(3)} if slot.cls == "QuantizedKVCache" else {"k", "v"}
            ok = (
                meta.get("kind") == "chunk"
                and slot.kind != "state"
                and set(mine) == want
                and str(layer) in str(meta.get("slots", "")).split(",")
                and meta.get("first") == str(row.first)
                and all(isinstance(s, list) and len(s) >= 2 and s[-2] == length - row.first for s in shapes)
            )
        if not ok:
            raise bad(f"blob {blob_id} does not hold layer {layer} of chunk {row.chunk_key.hex()} as the manifest says")


def _state_names(slot) -> set[str]:
    """The tensors a state blob of this slot may hold."""
    if slot.cls == "ArraysCache":
        return {f"s{i}" for i in range(dict(slot.params)["size"])}
    return {"k", "v"}


def read_manifest(file: str | os.PathLike) -> dict:
    """The manifest of an archive, unchecked (what it says it holds: agent, model, chunk size, ...)."""
    with open_archive(file) as tar:
        try:
            man = parse_manifest(manifest_bytes(tar, tar_members(tar)[0]))
        except (tarfile.TarError, EOFError) as e:
            raise bad(f"the tar file is damaged ({e})") from None
    if not isinstance(man, dict):
        raise bad("its manifest is not a kvstore manifest")
    return man


# -- keeping an import apart -----------------------------------------------------------------------


def namespace_of(fingerprint: str, manifest: bytes | bytearray) -> str:
    """The fingerprint an unverified import's chunks live under: derived from the model's and the
    archive's manifest, so two archives never share a namespace and no local save can reach one."""
    return xxhash.xxh3_128_hexdigest(b"kvstore-import\0" + bytes.fromhex(fingerprint) + bytes(manifest))


def _apart(plan: ArchivePlan, salted: str, chunk_size: int) -> ArchivePlan:
    """The plan re-keyed under fingerprint `salted`: the same rows and blobs, other chunk keys."""
    new_of: dict[bytes, bytes] = {}
    snaps = []
    for sn in plan.snapshots:
        keys = chunk_keys(salted, sn.tokens, chunk_size)
        new_of.update(zip(sn.keys, keys))
        snaps.append(replace(sn, keys=keys))
    return replace(
        plan,
        fingerprint=salted,
        snapshots=snaps,
        chunks={new_of[k]: place for k, place in plan.chunks.items()},
        layers=[r._replace(chunk_key=new_of[r.chunk_key]) for r in plan.layers],
    )


# -- import ----------------------------------------------------------------------------------------


def _plan_target(store: Stored, plan: ArchivePlan, name: str) -> dict[tuple[bytes, int], int]:
    """Refuse a clash with the target (agent name, model layout); return its (chunk, layer) -> first."""
    with db.transaction(store.engine, write=False, what="planning an import") as conn:
        _check_target(conn, plan, name)
        return queries.existing_layers(conn, sorted(plan.chunks))


def _check_target(conn, plan: ArchivePlan, name: str) -> None:
    if queries.agent_row(conn, name) is not None:
        raise AgentExistsError(
            f"an agent named {name!r} already exists in this store: import it under "
            "another name (--name NEW), or remove the existing one first"
        )
    layout = queries.model_layout(conn, plan.fingerprint)
    if layout is not None and db.parse_json(layout, "a model's cache layout") != json.loads(plan.layout):
        raise ModelMismatchError(
            f"this store records model {plan.fingerprint} with other cache layers than "
            "the archive does: the archive's caches cannot be used here"
        )


def _needed(plan: ArchivePlan, have: dict[tuple[bytes, int], int]) -> list[LayerRow]:
    """The layer rows the target lacks, or holds less of (a sliding-window layer's partial chunk)."""
    return [r for r in plan.layers if have.get((r.chunk_key, r.layer), r.first + 1) > r.first]


def import_agent(
    store: Importer,
    file: str | os.PathLike,
    name: str | None = None,
    progress: Progress = None,
    *,
    trust: bool = False,
    verify: Any = None,
) -> ArchiveSummary:
    """Bring the agent in archive `file` into `store` (as `name`, default its own name).

    Every blob is hashed and the manifest checked before anything is written; a damaged or
    edited archive raises ArchiveError and changes nothing. Blobs the store already holds are
    reused, not written again.

    Args:
        trust: merge the archive's chunks with the store's own, unverified. Without it (and without
            `verify`) they are kept apart: no other agent's save or restore ever uses them.
        verify: a loaded mlx-lm model (the archive's model): recompute every chunk's KV with it and
            merge only if all of it matches; otherwise ArchiveError and nothing is imported.
    """
    if store.readonly:
        raise ReadOnlyStoreError(f"the store at {store.path} is read-only: loads and exports work, imports do not")
    with open_archive(file) as tar:
        try:
            manifest_member, members = tar_members(tar)
            raw = manifest_bytes(tar, manifest_member)
            plan = check_manifest(parse_manifest(raw), store.chunk_size)
            target = validate_name(name) if name is not None else plan.name
            if set(members) != set(plan.sizes):
                missing = sorted(set(plan.sizes) - set(members))
                raise bad(f"blob {missing[0]} is missing" if missing else "it holds blobs its manifest does not list")
            merged = bool(trust) or verify is not None
            # What is written: the archive's own chunk keys, or the same rows under a namespace of their own.
            dest = plan if merged else _apart(plan, namespace_of(plan.fingerprint, raw), store.chunk_size)
            have = _plan_target(store, dest, target)
            uses: dict[str, list[LayerRow]] = {}
            for r in plan.layers:
                uses.setdefault(r.blob_id, []).append(r)
            needed = {r.blob_id for r in _needed(dest, have)}
            total = sum(plan.sizes.values())
            grand = total + sum(plan.sizes[b] for b in needed)
            done = 0
            for blob_id, nbytes in sorted(plan.sizes.items()):
                _check_blob(tar, members[blob_id], blob_id, nbytes, plan, uses[blob_id])
                done += nbytes
                if progress:
                    progress(done, grand)
            if verify is not None:
                from kvstore.ops.archive_verify import verify_kv

                verify_kv(plan, tar, members, verify, store.chunk_size)
            got = _write(
                store,
                _Source(tar, members, progress, done, grand),
                dest,
                target=target,
                have=have,
                original=None if merged else plan.fingerprint,
            )
            return replace(got, merged=merged)
        except (tarfile.TarError, EOFError) as e:
            raise bad(f"the tar file is damaged ({e})") from None


@dataclass(slots=True)
class _Source:
    """Where an import's blobs come from, and how far its progress got."""

    tar: tarfile.TarFile
    members: dict[str, tarfile.TarInfo]
    progress: Progress
    done: int  # bytes read so far
    grand: int  # bytes it reads in all

    def read(self, blob_id: str) -> bytearray:
        data = read_member(self.tar, self.members[blob_id])
        self.done += len(data)
        if self.progress:
            self.progress(min(self.done, self.grand), self.grand)
        return data


def _write(
    store: Importer,
    source: _Source,
    plan: ArchivePlan,
    *,
    target: str,
    have: dict[tuple[bytes, int], int],
    original: str | None,
) -> ArchiveSummary:
    """Write the blobs the store lacks, then commit every row in one transaction."""
    written: dict[str, bool] = {}  # blob id -> newly written by this import

    def attempt(number: int) -> list[int]:
        nonlocal have
        if number:  # a concurrent gc or save changed the rows the last attempt planned on
            have = _plan_target(store, plan, target)
        rows = _needed(plan, have)
        for blob_id in sorted({r.blob_id for r in rows} - set(written)):
            data = source.read(blob_id)
            got, _n, new = store.blobs.put([data])  # hashed again: the file could change after the check
            if got != blob_id:
                raise bad(f"blob {blob_id} changed while it was being imported")
            written[blob_id] = new
        store.blobs.sync_dirs(written)
        return _commit(store, plan, target=target, rows=rows, written=written, original=original)

    try:
        snap_ids = retrying(
            attempt,
            attempts=ATTEMPTS,
            gave_up=f"could not import agent {target!r}: concurrent saves and gc kept changing its chunks; try again",
        )
    except BaseException:
        _forget(store, [b for b, new in written.items() if new])
        raise
    head = plan.snapshots[plan.head]
    fresh_ids = [b for b, fresh in written.items() if fresh]
    return ArchiveSummary(
        agent=target,
        model=original or plan.fingerprint,
        snapshots=len(snap_ids),
        n_tokens=int(head.tokens.size),
        blobs=len(plan.sizes),
        bytes=sum(plan.sizes.values()),
        blobs_written=len(fresh_ids),
        bytes_written=sum(plan.sizes[b] for b in fresh_ids),
        blobs_reused=len(plan.sizes) - len(fresh_ids),
    )


def _commit(
    store: Importer,
    plan: ArchivePlan,
    *,
    target: str,
    rows: list[LayerRow],
    written: dict[str, bool],
    original: str | None,
) -> list[int]:
    """One write transaction: model, blobs, chunks, layer rows, agent, snapshots, head.

    `original` is the real model's fingerprint when the plan is kept apart under a namespace of its own.
    """
    now = db.now()
    mine = {(r.chunk_key, r.layer) for r in rows}
    chain = Chain(
        model=ModelEntry(
            fingerprint=plan.fingerprint,
            layout=plan.layout,
            name=plan.model_name if original is None else f"{plan.model_name or original}{KEPT_APART}",
            stands_for=original,
        ),
        agent=AgentEntry(
            name=target,
            meta_json=json.dumps(plan.meta, sort_keys=True, default=str),
            created=plan.created,
            updated=plan.updated,
            new=True,
        ),
        snapshots=plan.snapshots,
        head=plan.head,
        layers=rows,
        blobs={b: plan.sizes[b] for b in sorted({r.blob_id for r in rows})},
    )
    with db.transaction(store.engine, write=True, what=f"importing agent {target!r}") as conn:
        _check_target(conn, plan, target)
        # Under the write lock: what this import reuses must still be there (a gc may have run).
        reused = {(r.chunk_key, r.layer) for r in plan.layers} - mine
        ids = commit_chain(conn, chain, chunk_size=store.chunk_size, now=now, reused=reused)
        if store.blobs.missing(written):
            raise Retry()
    return ids


def _forget(store: Stored, blob_ids: list[str]) -> None:
    """After a failed import: remove the blob files it wrote that no row names (the store is as before)."""
    if not blob_ids:
        return
    try:
        with db.transaction(store.engine, write=True, what="undoing a failed import") as conn:
            named = queries.blob_rows_named(conn, blob_ids)
            for b in blob_ids:
                if b not in named:
                    store.blobs.remove(b)
    except (StoreError, OSError):
        pass  # what is left is unreferenced files: gc removes them after its grace period
