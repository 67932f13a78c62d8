"""Moving one agent between stores: a self-contained archive, verified in full before anything is written.

An archive is an uncompressed tar (blobs are already dense; a tar streams and can be inspected with
`tar tvf`). Its first member, `manifest.json`, holds the agent's record, its model's fingerprint and
cache layout, every snapshot's token ids and chunk list, the chunk rows, the (chunk, layer) -> blob
rows, and every blob's id and size. Then one member per blob, `blobs/<id>.safetensors`.

Import checks everything before it writes anything: the manifest's shape, each snapshot's chunk
keys re-derived from its tokens, each chunk's place and length, each layer row against the blob's
own header, and every blob's bytes against its id. A damaged or edited archive raises ArchiveError
and leaves the target store exactly as it was. Blobs the target already holds are not written again.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import xxhash
from sqlalchemy import insert, select, update

from kvstore.cache import codec
from kvstore.index import db
from kvstore.index import schema
from kvstore.index import sizes
from kvstore.blob.local import fsync_file
from kvstore.errors import AgentExistsError, ArchiveError, CorruptBlobError, ModelMismatchError, StoreError
from kvstore.formats import BLOB_SUFFIX, FORMAT_VERSION, HASH_NAME
from kvstore.cache.keys import chunk_keys, chunk_spans, tokens_from_bytes, tokens_to_array
from kvstore.names import validate_name
from kvstore.blob.tensorfile import HEADER_PROBE, parse_header
from kvstore.ops.save import _ids, existing_layers

if TYPE_CHECKING:
    from kvstore.store import Store

__all__ = ["export_agent", "import_agent", "read_manifest", "ArchiveSummary", "ARCHIVE_VERSION"]

ARCHIVE_VERSION = 1
MANIFEST = "manifest.json"
BLOB_PREFIX = "blobs/"
READ_SIZE = 1 << 20
MAX_MANIFEST = 1 << 30   # a manifest is token ids and rows: a gigabyte of it is not an archive we wrote
ATTEMPTS = 3
_HEX32 = re.compile(r"[0-9a-f]{32}")
Progress = Callable[[int, int], None] | None


@dataclass(frozen=True)
class ArchiveSummary:
    """What an export wrote or an import brought in."""

    agent: str
    model: str
    snapshots: int
    n_tokens: int            # tokens of the head snapshot
    blobs: int               # blobs in the archive
    bytes: int               # their bytes
    blobs_written: int = 0   # import: blob files written into the target store
    bytes_written: int = 0
    blobs_reused: int = 0    # import: blobs the target already held (not written again)

    def as_dict(self) -> dict:
        return asdict(self)


# -- export ----------------------------------------------------------------------------------------

def _collect(store: "Store", name: str) -> dict:
    """The manifest of agent `name`, read in one transaction."""
    from kvstore.ops.restore import head_snapshot

    a, m, s, sc, c, cl, b = (schema.agents, schema.models, schema.snapshots, schema.snapshot_chunks,
                             schema.chunks, schema.chunk_layers, schema.blobs)
    with db.transaction(store.engine, write=False, what=f"exporting agent {name!r}") as conn:
        head_snapshot(conn, name)  # UnknownAgentError, or an agent that has no snapshot to move
        agent = conn.execute(select(a).where(a.c.name == name)).first()
        model = conn.execute(select(m).where(m.c.id == agent.model_id)).first()
        snaps = conn.execute(select(s).where(s.c.agent_id == agent.id).order_by(s.c.id)).all()
        lists: dict[int, list[bytes]] = {sn.id: [] for sn in snaps}
        for sid, key in conn.execute(select(sc.c.snapshot_id, sc.c.chunk_key)
                                     .where(sc.c.snapshot_id.in_(list(lists))).order_by(sc.c.snapshot_id, sc.c.seq)):
            lists[sid].append(bytes(key))
        keys = sorted({k for ks in lists.values() for k in ks})
        chunk_rows, layer_rows = [], []
        for part in _ids(keys):
            chunk_rows += conn.execute(select(c.c.key, c.c.seq, c.c.length).where(c.c.key.in_(part))).all()
            layer_rows += conn.execute(select(cl.c.chunk_key, cl.c.layer, cl.c.blob_id, cl.c.first)
                                       .where(cl.c.chunk_key.in_(part))).all()
        blob_ids = sorted({r.blob_id for r in layer_rows})
        blob_rows = []
        for part in _ids(blob_ids):
            blob_rows += conn.execute(select(b.c.id, b.c.nbytes).where(b.c.id.in_(part))).all()
    return {
        "kvstore_archive": ARCHIVE_VERSION, "format_version": FORMAT_VERSION, "hash": HASH_NAME,
        "chunk_size": store.chunk_size, "exported": time.time(),
        "agent": {"name": agent.name, "meta": db.parse_json(agent.meta, f"agent {name!r}'s metadata"),
                  "created": agent.created, "updated": agent.updated},
        "model": {"fingerprint": model.fingerprint, "name": model.name,
                  "layout": db.parse_json(model.layout, f"model {model.fingerprint}'s cache layout")},
        "head": [sn.id for sn in snaps].index(agent.head),
        "snapshots": [{"n_tokens": sn.n_tokens, "tokens": tokens_from_bytes(sn.tokens), "created": sn.created,
                       "label": sn.label, "pinned": bool(sn.pinned), "chunks": [k.hex() for k in lists[sn.id]]}
                      for sn in snaps],
        "chunks": sorted(({"key": bytes(r.key).hex(), "seq": r.seq, "length": r.length} for r in chunk_rows),
                         key=lambda r: (r["seq"], r["key"])),
        "layers": sorted(({"chunk": bytes(r.chunk_key).hex(), "layer": r.layer, "blob": r.blob_id, "first": r.first}
                          for r in layer_rows), key=lambda r: (r["chunk"], r["layer"])),
        "blobs": [{"id": r.id, "nbytes": int(r.nbytes)} for r in sorted(blob_rows)],
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | bytearray, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_agent(store: "Store", name: str, file: str | os.PathLike, progress: Progress = None, *,
                 overwrite: bool = False) -> ArchiveSummary:
    """Write agent `name` (record, every snapshot, every blob they need) to the archive `file`.

    Every blob is checked against its hash as it is read: a damaged store exports nothing (run
    `kvstore fsck`). The archive appears under its name only once complete.
    """
    validate_name(name)
    target = Path(file)
    if target.exists() and not overwrite:
        raise FileExistsError(17, "the archive already exists: choose another file or overwrite it "
                                  "(--force, overwrite=True)", str(target))
    manifest = _collect(store, name)
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
                        raise CorruptBlobError(f"blob {bl['id']} is {len(data)} bytes, the index says "
                                               f"{bl['nbytes']}; run `kvstore fsck`", bl["id"], name)
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
    return ArchiveSummary(agent=name, model=manifest["model"]["fingerprint"], snapshots=len(manifest["snapshots"]),
                          n_tokens=head["n_tokens"], blobs=len(manifest["blobs"]), bytes=total)


# -- reading and checking an archive ---------------------------------------------------------------

def _bad(msg: str) -> ArchiveError:
    return ArchiveError(f"the archive is damaged or was edited: {msg}; nothing was imported")


def _members(tar: tarfile.TarFile) -> tuple[tarfile.TarInfo, dict[str, tarfile.TarInfo]]:
    """The manifest member and blob id -> member; anything else in the archive is refused."""
    manifest, blobs = None, {}
    for m in tar.getmembers():
        if not m.isfile():
            raise _bad(f"member {m.name!r} is not a regular file")
        if m.name == MANIFEST:
            if manifest is not None:
                raise _bad(f"{MANIFEST} appears twice")
            manifest = m
            continue
        blob_id = m.name[len(BLOB_PREFIX):-len(BLOB_SUFFIX)] if m.name.startswith(BLOB_PREFIX) \
            and m.name.endswith(BLOB_SUFFIX) else ""
        if not _HEX32.fullmatch(blob_id):
            raise _bad(f"unexpected member {m.name[:80]!r}")
        if blob_id in blobs:
            raise _bad(f"blob {blob_id} appears twice")
        blobs[blob_id] = m
    if manifest is None:
        raise _bad(f"it has no {MANIFEST} (is it a kvstore export?)")
    return manifest, blobs


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(f"{what} is {v!r}, not a whole number >= {lo}")
    return v


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{what} is {v!r}, not a number")
    return float(v)


def _check_manifest(man: Any, chunk_size: int) -> dict:
    """The manifest, checked for consistency in itself; returns the parsed pieces import needs."""
    if not isinstance(man, dict) or man.get("kvstore_archive") is None:
        raise _bad("its manifest is not a kvstore manifest")
    if man["kvstore_archive"] != ARCHIVE_VERSION:
        raise ArchiveError(f"the archive is version {man['kvstore_archive']!r}; this kvstore reads version "
                           f"{ARCHIVE_VERSION}: upgrade kvstore (pip install -U kvstore)")
    if _int(man.get("format_version"), "format_version", 1) > FORMAT_VERSION:
        raise ArchiveError(f"the archive holds blob format {man['format_version']}; this kvstore reads up to "
                           f"{FORMAT_VERSION}: upgrade kvstore (pip install -U kvstore)")
    if man.get("hash") != HASH_NAME:
        raise ArchiveError(f"the archive hashes with {man.get('hash')!r}; this kvstore uses {HASH_NAME}")
    if man.get("chunk_size") != chunk_size:
        raise ArchiveError(f"the archive was exported from a store with chunk size {man.get('chunk_size')!r} "
                           f"and this store uses {chunk_size}: import it into a store created with "
                           f"chunk_size={man.get('chunk_size')!r}")
    try:
        agent, model, snaps = man["agent"], man["model"], man["snapshots"]
        chunks, layers, blobs, head = man["chunks"], man["layers"], man["blobs"], man["head"]
        fp, layout = model["fingerprint"], model["layout"]
        name, meta = agent["name"], agent["meta"]
        _num(agent["created"], "the agent's created time")
        _num(agent["updated"], "the agent's updated time")
        if model.get("name") is not None and not isinstance(model["name"], str):
            raise _bad("the model's name is not text")
    except (KeyError, TypeError) as e:
        raise _bad(f"its manifest lacks {e}") from None
    if not isinstance(fp, str) or not _HEX32.fullmatch(fp):
        raise _bad(f"model fingerprint {str(fp)[:40]!r} is not 32 hex digits")
    if not isinstance(meta, dict):
        raise _bad("the agent's metadata is not an object")
    try:
        validate_name(name)
        _tree, slots = codec.layout_from_json(layout)
    except StoreError as e:
        raise _bad(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(f"the model's cache layout does not parse ({e!r})") from None
    if not isinstance(snaps, list) or not snaps:
        raise _bad("it lists no snapshots")
    if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < len(snaps):
        raise _bad(f"head {head!r} is not one of its {len(snaps)} snapshots")
    # Every snapshot's chunk list must be what its token ids hash to (never trust a key alone).
    where: dict[bytes, tuple[int, int]] = {}
    parsed_snaps = []
    for i, sn in enumerate(snaps):
        try:
            toks = tokens_to_array(sn["tokens"])
            n, listed = _int(sn["n_tokens"], f"snapshot {i}'s token count"), sn["chunks"]
            label, pinned = sn["label"], sn["pinned"]
            created = _num(sn["created"], f"snapshot {i}'s created time")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ArchiveError):
                raise
            raise _bad(f"snapshot {i} is malformed ({e})") from None
        if toks.size != n:
            raise _bad(f"snapshot {i} says {n} tokens but holds {toks.size} token ids")
        if label is not None:
            try:
                validate_name(label, "snapshot label")
            except StoreError as e:
                raise _bad(str(e)) from None
        if not isinstance(pinned, bool):
            raise _bad(f"snapshot {i}'s pinned flag is not true or false")
        keys = chunk_keys(fp, toks, chunk_size)
        if listed != [k.hex() for k in keys]:
            raise _bad(f"snapshot {i}'s token ids do not hash to the chunks it lists")
        for seq, (key, (_start, length)) in enumerate(zip(keys, chunk_spans(n, chunk_size))):
            if where.setdefault(key, (seq, length)) != (seq, length):
                raise _bad(f"chunk {key.hex()} sits at two places")
        parsed_snaps.append({"tokens": toks, "keys": keys, "created": created, "label": label, "pinned": pinned})
    if not isinstance(chunks, list) or not isinstance(layers, list) or not isinstance(blobs, list):
        raise _bad("its chunks, layers or blobs are not lists")
    seen = {}
    for row in chunks:
        try:
            key = bytes.fromhex(row["key"])
            place = (_int(row["seq"], "a chunk's seq"), _int(row["length"], "a chunk's length", 1))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArchiveError):
                raise
            raise _bad(f"a chunk row is malformed ({e})") from None
        if key in seen or where.get(key) != place:
            raise _bad(f"chunk row {key.hex()} does not match the snapshots' chunks")
        seen[key] = place
    if set(seen) != set(where):
        raise _bad(f"it lists {len(seen)} chunk rows for the {len(where)} chunks its snapshots use")
    sizes = {}
    for row in blobs:
        bid = row.get("id") if isinstance(row, dict) else None
        if not isinstance(bid, str) or not _HEX32.fullmatch(bid) or bid in sizes:
            raise _bad(f"blob id {str(bid)[:40]!r} is malformed or listed twice")
        sizes[bid] = _int(row.get("nbytes"), f"blob {bid}'s size", 1)
    layer_rows = []
    slots_of: dict[tuple[bytes, int], bool] = {}
    for row in layers:
        try:
            key = bytes.fromhex(row["chunk"])
            layer, bid = _int(row["layer"], "a layer number"), row["blob"]
            first = _int(row["first"], "a layer's first position")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArchiveError):
                raise
            raise _bad(f"a layer row is malformed ({e})") from None
        if key not in seen:
            raise _bad(f"a layer row names chunk {key.hex()}, which no snapshot uses")
        if layer >= len(slots) or first >= seen[key][1] or bid not in sizes or (key, layer) in slots_of:
            raise _bad(f"layer row ({key.hex()}, {layer}) does not fit the model's layout, its chunk "
                       "or the blob list")
        slots_of[(key, layer)] = True
        layer_rows.append({"chunk_key": key, "layer": layer, "blob_id": bid, "first": first})
    if set(sizes) != {r["blob_id"] for r in layer_rows}:
        raise _bad("it lists blobs that no layer row uses")
    return {"name": name, "meta": meta, "agent": agent, "fingerprint": fp, "model_name": model.get("name"),
            "layout": json.dumps(layout, sort_keys=True), "slots": slots, "snapshots": parsed_snaps,
            "head": head, "chunks": seen, "layers": layer_rows, "sizes": sizes}


def _check_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, blob_id: str, nbytes: int, plan: dict,
                uses: list[dict]) -> None:
    """The blob's bytes hash to its id, and its own header agrees with the layer rows naming it."""
    if member.size != nbytes:
        raise _bad(f"blob {blob_id} is {member.size} bytes, the manifest says {nbytes}")
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
        raise _bad(f"blob {blob_id}'s bytes do not match its hash")
    if len(head) < nbytes and len(head) >= 8 and 8 + int.from_bytes(head[:8], "little") > len(head):
        f.seek(0)
        head = f.read(8 + int.from_bytes(head[:8], "little"))
    try:
        _base, header, meta = parse_header(head, blob_id)
    except CorruptBlobError:
        raise _bad(f"blob {blob_id} is not a kvstore blob") from None
    if meta.get("model") != plan["fingerprint"]:
        raise _bad(f"blob {blob_id} was made by model {meta.get('model')}, not {plan['fingerprint']}")
    for row in uses:
        layer, length = row["layer"], plan["chunks"][row["chunk_key"]][1]
        if meta.get("kind") == "state":
            ok = meta.get("slot") == str(layer)
        else:
            shapes = [info["shape"] for tname, info in header.items() if tname.split(".")[0] == str(layer)]
            ok = (meta.get("kind") == "chunk" and str(layer) in meta.get("slots", "").split(",")
                  and meta.get("first") == str(row["first"]) and bool(shapes)
                  and all(len(s) >= 2 and s[-2] == length - row["first"] for s in shapes))
        if not ok:
            raise _bad(f"blob {blob_id} does not hold layer {layer} of chunk {row['chunk_key'].hex()} "
                       "as the manifest says")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    data = bytearray(member.size)
    view = memoryview(data)
    f = tar.extractfile(member)
    got = 0
    while got < member.size:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if got != member.size:
        raise _bad(f"member {member.name} is truncated")
    return data


def _open(file: str | os.PathLike) -> tarfile.TarFile:
    try:
        return tarfile.open(file, mode="r:")
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"{file} is not a kvstore archive (an uncompressed tar): {e}") from None


def _manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    if member.size > MAX_MANIFEST:
        raise _bad(f"its manifest is {member.size} bytes")
    try:
        return json.loads(_read_member(tar, member))
    except ValueError as e:
        raise _bad(f"its manifest is not JSON ({e})") from None


def read_manifest(file: str | os.PathLike) -> dict:
    """The manifest of an archive, unchecked (what it says it holds: agent, model, chunk size, ...)."""
    with _open(file) as tar:
        try:
            man = _manifest(tar, _members(tar)[0])
        except (tarfile.TarError, EOFError) as e:
            raise _bad(f"the tar file is damaged ({e})") from None
    if not isinstance(man, dict):
        raise _bad("its manifest is not a kvstore manifest")
    return man


# -- import ----------------------------------------------------------------------------------------

class _Retry(Exception):
    """A concurrent gc or save changed the rows this import planned on: plan again."""


def _plan_target(store: "Store", plan: dict, name: str) -> dict[tuple[bytes, int], int]:
    """Refuse a clash with the target (agent name, model layout); return its (chunk, layer) -> first."""
    with db.transaction(store.engine, write=False, what="planning an import") as conn:
        _check_target(conn, plan, name)
        return existing_layers(conn, sorted(plan["chunks"]))


def _check_target(conn, plan: dict, name: str) -> None:
    if conn.execute(select(schema.agents.c.id).where(schema.agents.c.name == name)).first() is not None:
        raise AgentExistsError(f"an agent named {name!r} already exists in this store: import it under "
                               "another name (--name NEW), or remove the existing one first")
    m = conn.execute(select(schema.models.c.layout).where(schema.models.c.fingerprint == plan["fingerprint"])).first()
    if m is not None and db.parse_json(m.layout, "a model's cache layout") != json.loads(plan["layout"]):
        raise ModelMismatchError(f"this store records model {plan['fingerprint']} with other cache layers than "
                                 "the archive does: the archive's caches cannot be used here")


def _needed(plan: dict, have: dict[tuple[bytes, int], int]) -> list[dict]:
    """The layer rows the target lacks, or holds less of (a sliding-window layer's partial chunk)."""
    return [r for r in plan["layers"] if have.get((r["chunk_key"], r["layer"]), r["first"] + 1) > r["first"]]


def import_agent(store: "Store", file: str | os.PathLike, name: str | None = None,
                 progress: Progress = None) -> ArchiveSummary:
    """Bring the agent in archive `file` into `store` (as `name`, default its own name).

    Every blob is hashed and the manifest checked before anything is written; a damaged or
    edited archive raises ArchiveError and changes nothing. Blobs the store already holds are
    reused, not written again.
    """
    store._writable()
    with _open(file) as tar:
        try:
            manifest_member, members = _members(tar)
            plan = _check_manifest(_manifest(tar, manifest_member), store.chunk_size)
            target = validate_name(name) if name is not None else plan["name"]
            if set(members) != set(plan["sizes"]):
                missing = sorted(set(plan["sizes"]) - set(members))
                raise _bad(f"blob {missing[0]} is missing" if missing else "it holds blobs its manifest does not list")
            have = _plan_target(store, plan, target)
            uses: dict[str, list[dict]] = {}
            for r in plan["layers"]:
                uses.setdefault(r["blob_id"], []).append(r)
            needed = {r["blob_id"] for r in _needed(plan, have)}
            total = sum(plan["sizes"].values())
            grand = total + sum(plan["sizes"][b] for b in needed)
            done = 0
            for blob_id, nbytes in sorted(plan["sizes"].items()):
                _check_blob(tar, members[blob_id], blob_id, nbytes, plan, uses[blob_id])
                done += nbytes
                if progress:
                    progress(done, grand)
            return _write(store, tar, members, plan, target, have, progress, done, grand)
        except (tarfile.TarError, EOFError) as e:
            raise _bad(f"the tar file is damaged ({e})") from None


def _write(store: "Store", tar, members, plan: dict, target: str, have, progress, done: int, grand: int
           ) -> ArchiveSummary:
    """Write the blobs the store lacks, then commit every row in one transaction."""
    written: dict[str, bool] = {}   # blob id -> newly written by this import
    try:
        for _attempt in range(ATTEMPTS):
            rows = _needed(plan, have)
            for blob_id in sorted({r["blob_id"] for r in rows} - set(written)):
                data = _read_member(tar, members[blob_id])
                got, _n, new = store.blobs.put([data])  # hashed again: the file could change after the check
                if got != blob_id:
                    raise _bad(f"blob {blob_id} changed while it was being imported")
                written[blob_id] = new
                done += len(data)
                if progress:
                    progress(min(done, grand), grand)
            store.blobs.sync_dirs(written)
            try:
                snap_ids = _commit(store, plan, target, rows, written)
                break
            except _Retry:
                have = _plan_target(store, plan, target)
        else:
            raise StoreError(f"could not import agent {target!r}: concurrent saves and gc kept changing its "
                             "chunks; try again")
    except BaseException:
        _forget(store, [b for b, new in written.items() if new])
        raise
    head = plan["snapshots"][plan["head"]]
    new = [b for b, fresh in written.items() if fresh]
    return ArchiveSummary(agent=target, model=plan["fingerprint"], snapshots=len(snap_ids),
                          n_tokens=int(head["tokens"].size), blobs=len(plan["sizes"]),
                          bytes=sum(plan["sizes"].values()), blobs_written=len(new),
                          bytes_written=sum(plan["sizes"][b] for b in new),
                          blobs_reused=len(plan["sizes"]) - len(new))


def _commit(store: "Store", plan: dict, target: str, rows: list[dict], written: dict[str, bool]) -> list[int]:
    """One write transaction: model, blobs, chunks, layer rows, agent, snapshots, head."""
    a, s, sc = schema.agents, schema.snapshots, schema.snapshot_chunks
    now = db.now()
    with db.transaction(store.engine, write=True, what=f"importing agent {target!r}") as conn:
        _check_target(conn, plan, target)
        # Under the write lock: what this import reuses must still be there (a gc may have run).
        still = existing_layers(conn, sorted(plan["chunks"]))
        mine = {(r["chunk_key"], r["layer"]) for r in rows}
        for r in plan["layers"]:
            if (r["chunk_key"], r["layer"]) not in mine and still.get((r["chunk_key"], r["layer"]),
                                                                      r["first"] + 1) > r["first"]:
                raise _Retry()
        if any(not store.blobs.path(b).exists() for b in written):
            raise _Retry()
        m = schema.models
        model_id = conn.execute(select(m.c.id).where(m.c.fingerprint == plan["fingerprint"])).scalar()
        if model_id is None:
            model_id = conn.execute(insert(m).values(fingerprint=plan["fingerprint"], name=plan["model_name"],
                                                     layout=plan["layout"], created=now).returning(m.c.id)).scalar_one()
        db.insert_ignore(conn, schema.blobs, [{"id": b, "nbytes": plan["sizes"][b], "created": now}
                                              for b in sorted({r["blob_id"] for r in rows})])
        # Chunk rows get their parent (the previous key of a snapshot's chain) and sizes, as a save's do.
        sizes.add_chains(conn, model_id, plan["fingerprint"], [sn["keys"] for sn in plan["snapshots"]],
                         {k: length for k, (_seq, length) in plan["chunks"].items()}, rows, plan["sizes"])
        agent = plan["agent"]
        agent_id = conn.execute(insert(a).values(
            name=target, model_id=model_id, meta=json.dumps(plan["meta"], sort_keys=True, default=str),
            created=float(agent["created"]), updated=float(agent["updated"])).returning(a.c.id)).scalar_one()
        ids = []
        for sn in plan["snapshots"]:
            sid = conn.execute(insert(s).values(
                agent_id=agent_id, model_id=model_id, n_tokens=int(sn["tokens"].size), tokens=sn["tokens"].tobytes(),
                created=sn["created"], label=sn["label"], pinned=sn["pinned"]).returning(s.c.id)).scalar_one()
            if sn["keys"]:
                conn.execute(insert(sc), [{"snapshot_id": sid, "seq": i, "chunk_key": k}
                                          for i, k in enumerate(sn["keys"])])
            ids.append(sid)
        conn.execute(update(a).where(a.c.id == agent_id).values(head=ids[plan["head"]]))
    return ids


def _forget(store: "Store", blob_ids: list[str]) -> None:
    """After a failed import: remove the blob files it wrote that no row names (the store is as before)."""
    if not blob_ids:
        return
    try:
        with db.transaction(store.engine, write=True, what="undoing a failed import") as conn:
            named = set()
            for part in _ids(blob_ids):
                named |= {b for (b,) in conn.execute(select(schema.blobs.c.id).where(schema.blobs.c.id.in_(part)))}
            for b in blob_ids:
                if b not in named:
                    store.blobs.remove(b)
    except (StoreError, OSError):
        pass  # what is left is unreferenced files: gc removes them after its grace period
