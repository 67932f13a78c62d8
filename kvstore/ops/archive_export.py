"""Writing one agent to an archive: its record, every snapshot, and every blob they need, each blob verified as read."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvstore.blob.local import fsync_file
from kvstore.cache.keys import chunk_keys, tokens_from_bytes
from kvstore.errors import CorruptBlobError
from kvstore.formats import BLOB_SUFFIX, FORMAT_VERSION, HASH_NAME
from kvstore.index import db
from kvstore.index import reads_export as reads
from kvstore.names import validate_name
from kvstore.ops.archive_manifest import ARCHIVE_VERSION
from kvstore.ops.archive_tar import BLOB_PREFIX, MANIFEST

if TYPE_CHECKING:
    from kvstore.index.db import Engine  # the index's engine (SQLAlchemy stays in kvstore.index)
    from kvstore.ops.parts import Stored

Progress = Callable[[int, int], None] | None
KEPT_APART = " (imported, kept apart)"  # the suffix of a kept-apart import's model name


@dataclass(frozen=True)
class ArchiveSummary:
    """What an export wrote or an import brought in."""

    agent: str
    model: str
    snapshots: int
    n_tokens: int  # tokens of the head snapshot
    blobs: int  # blobs in the archive
    bytes: int  # their bytes
    blobs_written: int = 0  # import: blob files written into the target store
    bytes_written: int = 0
    blobs_reused: int = 0  # import: blobs the target already held (not written again)
    merged: bool = False  # import: its chunks joined the store's own (trusted or verified), not kept apart

    def as_dict(self) -> dict:
        return asdict(self)


# -- export ----------------------------------------------------------------------------------------


def _collect(*, engine: Engine, chunk_size: int, name: str) -> dict:
    """The manifest of agent `name`, read in one transaction."""
    with db.transaction(engine, write=False, what=f"exporting agent {name!r}") as conn:
        rows = reads.agent_rows(conn, name)
    agent, model, real, snaps, lists = rows.agent, rows.model, rows.real, rows.snapshots, rows.lists
    chunk_rows, layer_rows, blob_rows = rows.chunks, rows.layers, rows.blobs
    rekey: dict[bytes, bytes] = {}
    if real is not None:
        for sn in snaps:
            rekey.update(zip(lists[sn.id], chunk_keys(real, tokens_from_bytes(sn.tokens), chunk_size)))
        lists = {sid: [rekey[k] for k in ks] for sid, ks in lists.items()}
    key_of = lambda k: rekey.get(bytes(k), bytes(k)).hex()  # noqa: E731
    return {
        "kvstore_archive": ARCHIVE_VERSION,
        "format_version": FORMAT_VERSION,
        "hash": HASH_NAME,
        "chunk_size": chunk_size,
        "exported": time.time(),
        "agent": {
            "name": agent.name,
            "meta": db.parse_json(agent.meta, f"agent {name!r}'s metadata"),
            "created": agent.created,
            "updated": agent.updated,
        },
        "model": {
            "fingerprint": real or model.fingerprint,
            "name": model.name.removesuffix(KEPT_APART) if real and model.name else model.name,
            "layout": db.parse_json(model.layout, f"model {model.fingerprint}'s cache layout"),
        },
        "head": [sn.id for sn in snaps].index(agent.head),
        "snapshots": [
            {
                "n_tokens": sn.n_tokens,
                "tokens": tokens_from_bytes(sn.tokens),
                "created": sn.created,
                "label": sn.label,
                "pinned": bool(sn.pinned),
                "chunks": [k.hex() for k in lists[sn.id]],
            }
            for sn in snaps
        ],
        "chunks": sorted(
            ({"key": key_of(r.key), "seq": r.seq, "length": r.length} for r in chunk_rows),
            key=lambda r: (r["seq"], r["key"]),
        ),
        "layers": sorted(
            ({"chunk": key_of(r.chunk_key), "layer": r.layer, "blob": r.blob_id, "first": r.first} for r in layer_rows),
            key=lambda r: (r["chunk"], r["layer"]),
        ),
        "blobs": [{"id": r.id, "nbytes": int(r.nbytes)} for r in sorted(blob_rows)],
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | bytearray, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_agent(
    store: Stored, name: str, file: str | os.PathLike, progress: Progress = None, *, overwrite: bool = False
) -> ArchiveSummary:
    """Write agent `name` (record, every snapshot, every blob they need) to the archive `file`.

    Every blob is checked against its hash as it is read: a damaged store exports nothing (run
    `kvstore fsck`). The archive appears under its name only once complete.
    """
    validate_name(name)
    target = Path(file)
    if target.exists() and not overwrite:
        raise FileExistsError(
            17, "the archive already exists: choose another file or overwrite it (--force, overwrite=True)", str(target)
        )
    manifest = _collect(engine=store.engine, chunk_size=store.chunk_size, name=name)
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    total = sum(bl["nbytes"] for bl in manifest["blobs"])
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    done = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add_member(tar, MANIFEST, raw, manifest["exported"])
                for bl in manifest["blobs"]:
                    data = store.blobs.read(bl["id"], agent=name)  # verified against its id
                    if len(data) != bl["nbytes"]:
                        raise CorruptBlobError(
                            f"blob {bl['id']} is {len(data)} bytes, the index says {bl['nbytes']}; run `kvstore fsck`",
                            bl["id"],
                            name,
                        )
                    _add_member(tar, BLOB_PREFIX + bl["id"] + BLOB_SUFFIX, data, manifest["exported"])
                    done += len(data)
                    if progress:
                        progress(done, total)
            f.flush()
            fsync_file(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    head = manifest["snapshots"][manifest["head"]]
    return ArchiveSummary(
        agent=name,
        model=manifest["model"]["fingerprint"],
        snapshots=len(manifest["snapshots"]),
        n_tokens=head["n_tokens"],
        blobs=len(manifest["blobs"]),
        bytes=total,
    )
