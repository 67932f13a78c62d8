"""Checking an archive's manifest in itself, step by step, before any blob is read or written.

Each step takes the part of the manifest it checks and returns it parsed; `check_manifest` runs
them in order and gathers an `ArchivePlan`. A failed step raises ArchiveError naming what is wrong:
an archive's contents never reach the store (or a terminal, or a later load) unchecked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.cache import codec
from kvstore.cache.keys import chunk_keys, chunk_spans, tokens_to_array
from kvstore.errors import ArchiveError, StoreError
from kvstore.formats import FORMAT_VERSION, HASH_NAME
from kvstore.index.commit import LayerRow, NewSnapshot
from kvstore.names import validate_name
from kvstore.ops.archive_tar import _HEX32, MAX_JSON_DEPTH, bad

ARCHIVE_VERSION = 1
# Timestamps are seconds since 1970: a created time past year 9999 cannot be shown by time.localtime
# (`kvstore agents` failed for the whole store on one archive's 1e300).
MAX_TIME = 253402300799.0
MAX_LAYOUT_SLOTS = 4096
QUANT_BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class ArchivePlan:
    """A checked manifest: what an import writes."""

    name: str
    meta: dict
    created: float
    updated: float
    fingerprint: str
    model_name: str | None
    layout: str  # canonical JSON text of the cache layout
    slots: list
    snapshots: list[NewSnapshot]  # token ids (uint32 array), chunk keys, created, label, pinned
    head: int
    chunks: dict[bytes, tuple[int, int]]  # key -> (seq, length)
    layers: list[LayerRow]
    sizes: dict[str, int]  # blob id -> bytes


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise bad(f"{what} is {v!r}, not a whole number >= {lo}")
    return v


def _time(v: Any, what: str) -> float:
    """A finite timestamp a calendar can show (not NaN, Infinity, negative or 1e300)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= MAX_TIME:
        raise bad(f"{what} is {str(v)[:40]!r}, not a time between 1970 and 9999")
    return float(v)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_versions(man: Any, chunk_size: int) -> None:
    """A kvstore manifest this code can read, made with this store's hash and chunk size."""
    if not isinstance(man, dict) or man.get("kvstore_archive") is None:
        raise bad("its manifest is not a kvstore manifest")
    if man["kvstore_archive"] != ARCHIVE_VERSION:
        raise ArchiveError(
            f"the archive is version {str(man['kvstore_archive'])[:20]!r}; this kvstore reads "
            f"version {ARCHIVE_VERSION}: upgrade kvstore (pip install -U kvstore)"
        )
    if _int(man.get("format_version"), "format_version", 1) > FORMAT_VERSION:
        raise ArchiveError(
            f"the archive holds blob format {man['format_version']}; this kvstore reads up to "
            f"{FORMAT_VERSION}: upgrade kvstore (pip install -U kvstore)"
        )
    if man.get("hash") != HASH_NAME:
        raise ArchiveError(f"the archive hashes with {str(man.get('hash'))[:40]!r}; this kvstore uses {HASH_NAME}")
    if man.get("chunk_size") != chunk_size:
        theirs = str(man.get("chunk_size"))[:20]
        raise ArchiveError(
            f"the archive was exported from a store with chunk size {theirs} and this store uses "
            f"{chunk_size}: import it into a store created with chunk_size={theirs}"
        )


def check_agent(agent: Any) -> tuple[str, dict, float, float]:
    """(name, metadata, created, updated) of the agent record."""
    if not isinstance(agent, dict):
        raise bad("its agent record is not an object")
    try:
        name, meta = agent["name"], agent["meta"]
        created, updated = agent["created"], agent["updated"]
    except KeyError as e:
        raise bad(f"its agent record lacks {e}") from None
    try:
        validate_name(name)
    except StoreError as e:
        raise bad(str(e)) from None
    if not isinstance(meta, dict):
        raise bad("the agent's metadata is not an object")
    if _depth(meta) > MAX_JSON_DEPTH:
        raise bad(f"the agent's metadata nests more than {MAX_JSON_DEPTH} levels deep")
    return name, meta, _time(created, "the agent's created time"), _time(updated, "the agent's updated time")


def _slot(raw: Any, i: int) -> codec.Slot:
    """One layout slot, as codec.describe would have written it for a real cache."""
    if (
        not isinstance(raw, list)
        or len(raw) != 3
        or not isinstance(raw[0], str)
        or not isinstance(raw[2], list)
        or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in raw[2])
    ):
        raise bad(f"layout slot {i} is not [class, kind, [[name, value], ...]]")
    cls, kind, params = raw[0], raw[1], {p[0]: p[1] for p in raw[2]}
    ints = {k: v for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool)}
    if len(ints) != len(params) or len(params) != len(raw[2]):
        raise bad(f"layout slot {i}'s parameters are not distinct whole numbers")
    want = {
        "KVCache": ((), "kv"),
        "QuantizedKVCache": (("bits", "group_size"), "kv"),
        "RotatingKVCache": (("keep", "max_size"), "rot" if params.get("keep") == 0 else "state"),
        "ChunkedKVCache": (("chunk_size",), "rot"),
        "ArraysCache": (("size",), "state"),
    }.get(cls)
    if want is None:
        raise bad(f"layout slot {i} names cache class {cls[:40]!r}, which kvstore does not store")
    if tuple(sorted(params)) != want[0] or kind != want[1]:
        raise bad(
            f"layout slot {i} ({cls}) has kind {str(kind)[:20]!r} and parameters {sorted(params)}, "
            f"not {want[1]!r} and {list(want[0])}"
        )
    ok = {
        "KVCache": True,
        "QuantizedKVCache": params.get("bits") in QUANT_BITS and params.get("group_size") in (32, 64, 128),
        "RotatingKVCache": 0 <= params.get("keep", -1) < params.get("max_size", 0) <= 1 << 24,
        "ChunkedKVCache": 1 <= params.get("chunk_size", 0) <= 1 << 24,
        "ArraysCache": 1 <= params.get("size", 0) <= 64,
    }[cls]
    if not ok:
        raise bad(f"layout slot {i} ({cls}) has parameters out of range: {params}")
    return codec.Slot(cls, kind, tuple(sorted(params.items())))


def _tree(nodes: Any, n_slots: int) -> list:
    """The layout tree: slot numbers 0..n-1 in order, each once, grouped by CacheList objects."""
    seen: list[int] = []

    def walk(node: Any, depth: int) -> None:
        if depth > 8:
            raise bad("the cache layout nests CacheList objects too deeply")
        if isinstance(node, dict) and list(node) == ["CacheList"] and isinstance(node["CacheList"], list):
            for sub in node["CacheList"]:
                walk(sub, depth + 1)
        elif isinstance(node, int) and not isinstance(node, bool):
            seen.append(node)
        else:
            raise bad("the cache layout's tree holds something other than slot numbers and CacheLists")

    if not isinstance(nodes, list) or not nodes:
        raise bad("the cache layout's tree is not a list of layers")
    for node in nodes:
        walk(node, 0)
    if seen != list(range(n_slots)):
        raise bad(f"the cache layout's tree names slots {seen[:8]}..., not each of its {n_slots} slots once, in order")
    return nodes


def check_layout(layout: Any) -> tuple[str, list]:
    """(canonical layout text, slots): the layout is exactly what codec.describe writes for some cache.

    A crafted layout once made loads raise IndexError/KeyError/TypeError and blocked the real
    model's saves for good (issue 15, item 6).
    """
    if not isinstance(layout, dict) or sorted(layout) != ["slots", "tree"] or not isinstance(layout["slots"], list):
        raise bad("the model's cache layout is not {tree, slots}")
    if not 1 <= len(layout["slots"]) <= MAX_LAYOUT_SLOTS:
        raise bad(f"the model's cache layout has {len(layout['slots'])} slots")
    slots = [_slot(raw, i) for i, raw in enumerate(layout["slots"])]
    tree = _tree(layout["tree"], len(slots))
    canonical = codec.layout_json(tree, slots)
    if json.loads(json.dumps(canonical)) != layout:
        raise bad("the model's cache layout is not in its canonical form")
    return json.dumps(canonical, sort_keys=True), slots


def check_model(model: Any) -> tuple[str, str | None, str, list]:
    """(fingerprint, name, canonical layout, slots) of the model record."""
    if not isinstance(model, dict) or "fingerprint" not in model or "layout" not in model:
        raise bad("its model record lacks a fingerprint or layout")
    fp, name = model["fingerprint"], model.get("name")
    if not isinstance(fp, str) or not _HEX32.fullmatch(fp):
        raise bad(f"model fingerprint {str(fp)[:40]!r} is not 32 hex digits")
    if name is not None and (not isinstance(name, str) or len(name) > 4096):
        raise bad("the model's name is not text of at most 4096 characters")
    layout, slots = check_layout(model["layout"])
    return fp, name, layout, slots


def check_snapshots(
    snaps: Any, head: Any, fp: str, chunk_size: int
) -> tuple[list[NewSnapshot], dict[bytes, tuple[int, int]]]:
    """Parsed snapshots, and where each chunk sits: every chunk list is what its token ids hash to."""
    if not isinstance(snaps, list) or not snaps:
        raise bad("it lists no snapshots")
    if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < len(snaps):
        raise bad(f"head {str(head)[:20]!r} is not one of its {len(snaps)} snapshots")
    where: dict[bytes, tuple[int, int]] = {}
    parsed = []
    for i, sn in enumerate(snaps):
        if not isinstance(sn, dict):
            raise bad(f"snapshot {i} is not an object")
        try:
            toks = tokens_to_array(sn["tokens"])
            n, listed = _int(sn["n_tokens"], f"snapshot {i}'s token count"), sn["chunks"]
            label, pinned = sn["label"], sn["pinned"]
            created = _time(sn["created"], f"snapshot {i}'s created time")
        except ArchiveError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise bad(f"snapshot {i} is malformed ({str(e)[:80]})") from None
        if toks.size != n:
            raise bad(f"snapshot {i} says {n} tokens but holds {toks.size} token ids")
        if label is not None:
            try:
                validate_name(label, "snapshot label")
            except StoreError as e:
                raise bad(str(e)) from None
        if not isinstance(pinned, bool):
            raise bad(f"snapshot {i}'s pinned flag is not true or false")
        keys = chunk_keys(fp, toks, chunk_size)
        if listed != [k.hex() for k in keys]:  # never trust a key alone
            raise bad(f"snapshot {i}'s token ids do not hash to the chunks it lists")
        for seq, (key, (_start, length)) in enumerate(zip(keys, chunk_spans(n, chunk_size))):
            if where.setdefault(key, (seq, length)) != (seq, length):
                raise bad(f"chunk {key.hex()} sits at two places")
        parsed.append(NewSnapshot(tokens=np.asarray(toks), keys=keys, created=created, label=label, pinned=pinned))
    return parsed, where


def _key(v: Any, what: str) -> bytes:
    if not isinstance(v, str) or not _HEX32.fullmatch(v):
        raise bad(f"{what} {str(v)[:40]!r} is not 32 hex digits")
    return bytes.fromhex(v)


def check_chunk_rows(chunks: Any, where: dict[bytes, tuple[int, int]]) -> dict[bytes, tuple[int, int]]:
    """The chunk rows: exactly the snapshots' chunks, each at its place."""
    if not isinstance(chunks, list):
        raise bad("its chunks are not a list")
    seen = {}
    for row in chunks:
        if not isinstance(row, dict):
            raise bad("a chunk row is not an object")
        key = _key(row.get("key"), "a chunk key")
        place = (_int(row.get("seq"), "a chunk's seq"), _int(row.get("length"), "a chunk's length", 1))
        if key in seen or where.get(key) != place:
            raise bad(f"chunk row {key.hex()} does not match the snapshots' chunks")
        seen[key] = place
    if set(seen) != set(where):
        raise bad(f"it lists {len(seen)} chunk rows for the {len(where)} chunks its snapshots use")
    return seen


def check_blob_rows(blobs: Any) -> dict[str, int]:
    """Blob id -> bytes, each blob listed once."""
    if not isinstance(blobs, list):
        raise bad("its blobs are not a list")
    sizes = {}
    for row in blobs:
        bid = row.get("id") if isinstance(row, dict) else None
        if not isinstance(bid, str) or not _HEX32.fullmatch(bid) or bid in sizes:
            raise bad(f"blob id {str(bid)[:40]!r} is malformed or listed twice")
        sizes[bid] = _int(row.get("nbytes"), f"blob {bid}'s size", 1)
    return sizes


def check_layer_rows(
    layers: Any, chunks: dict[bytes, tuple[int, int]], n_slots: int, sizes: dict[str, int]
) -> list[LayerRow]:
    """The (chunk, layer) -> blob rows: each fits the layout, its chunk and the blob list; every blob is used."""
    if not isinstance(layers, list):
        raise bad("its layers are not a list")
    rows, placed = [], set()
    for row in layers:
        if not isinstance(row, dict):
            raise bad("a layer row is not an object")
        key = _key(row.get("chunk"), "a layer row's chunk")
        layer, bid = _int(row.get("layer"), "a layer number"), row.get("blob")
        first = _int(row.get("first"), "a layer's first position")
        if key not in chunks:
            raise bad(f"a layer row names chunk {key.hex()}, which no snapshot uses")
        if layer >= n_slots or first >= chunks[key][1] or bid not in sizes or (key, layer) in placed:
            raise bad(f"layer row ({key.hex()}, {layer}) does not fit the model's layout, its chunk or the blob list")
        placed.add((key, layer))
        rows.append(LayerRow(key, layer, bid, first))
    if set(sizes) != {r.blob_id for r in rows}:
        raise bad("it lists blobs that no layer row uses")
    return rows


def check_manifest(man: Any, chunk_size: int) -> ArchivePlan:
    """The manifest, checked for consistency in itself, as the plan an import writes."""
    check_versions(man, chunk_size)
    missing = [k for k in ("agent", "model", "snapshots", "head", "chunks", "layers", "blobs") if k not in man]
    if missing:
        raise bad(f"its manifest lacks {missing[0]!r}")
    name, meta, created, updated = check_agent(man["agent"])
    fp, model_name, layout, slots = check_model(man["model"])
    snaps, where = check_snapshots(man["snapshots"], man["head"], fp, chunk_size)
    chunks = check_chunk_rows(man["chunks"], where)
    sizes = check_blob_rows(man["blobs"])
    layers = check_layer_rows(man["layers"], chunks, len(slots), sizes)
    return ArchivePlan(
        name=name,
        meta=meta,
        created=created,
        updated=updated,
        fingerprint=fp,
        model_name=model_name,
        layout=layout,
        slots=slots,
        snapshots=snaps,
        head=man["head"],
        chunks=chunks,
        layers=layers,
        sizes=sizes,
    )
