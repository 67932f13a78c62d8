"""Between mlx-lm cache objects and per-(chunk, layer) pieces of arrays.

A model's cache is a list of cache objects; `CacheList` nests more. The codec flattens the tree to
*slots* (leaf caches in depth-first order) and describes it as a *layout* (JSON-able), so a restore
can rebuild the tree without trusting a class name from a file. Each slot is one of three kinds:

- "kv":  `KVCache`, `QuantizedKVCache`: every position is held; chunked and deduplicated.
- "rot": `RotatingKVCache` with keep=0 (sliding-window layers) and `ChunkedKVCache` (llama4's
         chunked-attention layers): hold a window of recent positions; chunked over what they hold,
         a chunk's leading part may be missing (`first`).
- "state": `ArraysCache` (recurrent state) and `RotatingKVCache` with keep>0: one blob of the whole
         state, valid at exactly the snapshot's length.
Only used positions are stored, never the allocation padding.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import mlx.core as mx

from kvstore.errors import StoreError, UnsupportedCacheError

# The explicit registry of known classes; exact types only (a subclass may change the layout).
KNOWN_CLASSES = ("KVCache", "QuantizedKVCache", "RotatingKVCache", "ChunkedKVCache", "ArraysCache", "CacheList")


class _MlxLmCache:
    """mlx_lm.models.cache, imported on first use: it pulls in transformers (about a second), and the
    command line's read commands (`kvstore info`) reach this module without ever touching a cache."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("mlx_lm.models.cache"), name)


mlc = _MlxLmCache()


@cache
def known_class(name: str) -> type[Any] | None:
    """The mlx-lm class registered under `name`, or None: never a lookup of an arbitrary name."""
    return getattr(mlc, name) if name in KNOWN_CLASSES else None


@dataclass(frozen=True)
class Slot:
    """A leaf cache's description: its class, its kind and the parameters needed to rebuild it."""

    cls: str
    kind: str  # "kv" | "rot" | "state"
    params: tuple = ()  # sorted (name, value) pairs

    def param(self, name: str) -> Any:
        return dict(self.params)[name]


# -- layout ------------------------------------------------------------------------------------


def _describe(c: Any, slots: list[Slot], leaves: list[Any]) -> Any:
    name = type(c).__name__
    if known_class(name) is not type(c):
        raise UnsupportedCacheError(
            f"cannot store a {type(c).__module__}.{name}: kvstore stores KVCache, QuantizedKVCache, "
            "RotatingKVCache, ChunkedKVCache, ArraysCache and CacheList (it never pickles unknown classes)"
        )
    if name == "CacheList":
        return {"CacheList": [_describe(sub, slots, leaves) for sub in c.caches]}
    if name == "KVCache":
        slot = Slot(name, "kv")
    elif name == "QuantizedKVCache":
        slot = Slot(name, "kv", (("bits", c.bits), ("group_size", c.group_size)))
    elif name == "RotatingKVCache":
        kind = "rot" if c.keep == 0 else "state"
        slot = Slot(name, kind, (("keep", c.keep), ("max_size", c.max_size)))
    elif name == "ChunkedKVCache":
        slot = Slot(name, "rot", (("chunk_size", c.chunk_size),))
    else:  # ArraysCache
        slot = Slot(name, "state", (("size", len(c.cache)),))
    slots.append(slot)
    leaves.append(c)
    return len(slots) - 1


def describe(cache: list) -> tuple[list, list[Slot], list[Any]]:
    """(layout tree, slots, leaf caches) of a model cache."""
    slots: list[Slot] = []
    leaves: list[Any] = []
    tree = [_describe(c, slots, leaves) for c in cache]
    return tree, slots, leaves


def layout_json(tree: list, slots: list[Slot]) -> dict:
    return {"tree": tree, "slots": [[s.cls, s.kind, [list(p) for p in s.params]] for s in slots]}


def layout_from_json(data: dict) -> tuple[list, list[Slot]]:
    slots = [Slot(cls, kind, tuple((k, v) for k, v in params)) for cls, kind, params in data["slots"]]
    for s in slots:
        if s.cls not in KNOWN_CLASSES:
            raise UnsupportedCacheError(f"the store names an unknown cache class {s.cls!r}")
    return data["tree"], slots


# -- taking pieces out of a live cache ---------------------------------------------------------


def leaf_offset(c: Any) -> int | None:
    """Tokens a leaf cache has seen (None for a recurrent state, which does not count them)."""
    if isinstance(c, mlc.ArraysCache):
        return None
    return int(c.offset)


def held_range(slot: Slot, c: Any) -> tuple[int, int]:
    """[lo, hi) positions whose keys and values the leaf holds."""
    if slot.kind == "kv":
        return 0, int(c.offset)
    if slot.kind == "rot":
        if c.keys is None:
            return 0, 0
        if slot.cls == "ChunkedKVCache":
            return int(c.start_position), int(c.offset)
        held = c._temporal_order(c.keys).shape[2] if c.offset >= c.keys.shape[2] else c.offset
        return int(c.offset) - held, int(c.offset)
    raise ValueError("a state slot has no positions")


def rotating_arrays(c: Any) -> tuple[mx.array, mx.array]:
    """Keys and values in temporal order, padding cut off."""
    if isinstance(c, mlc.ChunkedKVCache):
        return c.keys_and_values()
    if c.offset < c.keys.shape[2]:
        return c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    return c._temporal_order(c.keys), c._temporal_order(c.values)


def extract(slot: Slot, c: Any, start: int, end: int) -> dict[str, mx.array]:
    """Arrays of positions [start, end) of a kv or rot slot (which must hold them)."""
    if slot.cls == "QuantizedKVCache":
        out = {}
        for prefix, parts in (("k", c.keys), ("v", c.values)):
            for i, part in enumerate(parts):
                out[f"{prefix}{i}"] = part[..., start:end, :]
        return out
    if slot.kind == "rot":
        lo, _ = held_range(slot, c)
        keys, values = rotating_arrays(c)
        return {"k": keys[..., start - lo : end - lo, :], "v": values[..., start - lo : end - lo, :]}
    return {"k": c.keys[..., start:end, :], "v": c.values[..., start:end, :]}


def extract_state(slot: Slot, c: Any, at: int) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The whole state of a state slot after `at` tokens, and metadata saying how to put it back.

    The metadata records `at`: a state is valid at exactly that position, and a restore checks it
    (`state_position`) before using the blob.
    """
    if slot.cls == "RotatingKVCache":
        if c.keys is None:
            return {}, {"offset": str(c.offset), "empty": "1", "at": str(at)}
        keys, values = rotating_arrays(c)
        return {"k": keys, "v": values}, {"offset": str(c.offset), "at": str(at)}
    arrays = {f"s{i}": a for i, a in enumerate(c.cache) if a is not None}
    if c.left_padding is not None or c.lengths is not None:
        raise UnsupportedCacheError(
            "an ArraysCache in the middle of a batch (left_padding/lengths set) "
            "cannot be stored; store a single-sequence cache"
        )
    return arrays, {"present": ",".join(str(i) for i, a in enumerate(c.cache) if a is not None), "at": str(at)}


def state_position(meta: dict) -> int | None:
    """The token position a state blob was taken at (None for blobs written before it was recorded)."""
    at = meta.get("at")
    return int(at) if isinstance(at, str) and at.isdigit() else None


# -- building caches back ----------------------------------------------------------------------


def _concat(pieces: list[mx.array]) -> mx.array:
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=2)


def build_leaf(slot: Slot, pieces: list[dict[str, mx.array]], n_tokens: int, state_meta: dict | None = None) -> Any:
    """A fresh leaf cache holding `pieces` (in position order) and positioned at n_tokens.

    The arrays are new objects built for this cache alone: two restores never share an array
    that an append could write into.
    """
    p = dict(slot.params)
    if slot.kind == "state":
        return _build_state(slot, pieces[0] if pieces else {}, state_meta or {}, n_tokens)
    if slot.cls == "QuantizedKVCache":
        c = mlc.QuantizedKVCache(group_size=p["group_size"], bits=p["bits"])
        if pieces:
            c.keys = tuple(_concat([pc[f"k{i}"] for pc in pieces]) for i in range(3))
            c.values = tuple(_concat([pc[f"v{i}"] for pc in pieces]) for i in range(3))
            c.offset = n_tokens
        return c
    if slot.cls == "ChunkedKVCache":
        c = mlc.ChunkedKVCache(p["chunk_size"])
        c.offset = c.start_position = n_tokens
        if pieces:
            c.keys = _concat([pc["k"] for pc in pieces])
            c.values = _concat([pc["v"] for pc in pieces])
            c.start_position = n_tokens - c.keys.shape[2]
        return c
    c = mlc.KVCache() if slot.cls == "KVCache" else mlc.RotatingKVCache(max_size=p["max_size"], keep=p["keep"])
    if pieces:
        c.keys = _concat([pc["k"] for pc in pieces])
        c.values = _concat([pc["v"] for pc in pieces])
        c.offset = n_tokens
        if slot.kind == "rot":
            c._idx = c.keys.shape[2]
    return c


def _build_state(slot: Slot, arrays: dict, meta: dict, n_tokens: int) -> Any:
    p = dict(slot.params)
    if slot.cls == "RotatingKVCache":
        c = mlc.RotatingKVCache(max_size=p["max_size"], keep=p["keep"])
        if arrays:
            c.keys, c.values = arrays["k"], arrays["v"]
            c.offset = int(meta.get("offset", n_tokens))
            c._idx = c.keys.shape[2]
        return c
    c = mlc.ArraysCache(p["size"])
    for i in (int(x) for x in meta.get("present", "").split(",") if x != ""):
        c.cache[i] = arrays[f"s{i}"]
    return c


def build(tree: list, leaves: list[Any]) -> list:
    """The model cache list from a layout tree and its rebuilt leaves."""
    return [_build_node(n, leaves) for n in tree]


# Module level, not a closure: a nested recursive function is a reference cycle (it holds its own
# cell), and that kept every restored cache's arrays alive after the caller dropped them, until
# Python's cycle collector happened to run.
def _build_node(node, leaves: list[Any]):
    if isinstance(node, dict):
        return mlc.CacheList(*[_build_node(n, leaves) for n in node["CacheList"]])
    return leaves[node]


def window_start(slot: Slot, n_tokens: int) -> int:
    """First position a rot slot needs at length n_tokens (its window).

    A ChunkedKVCache layer (llama4) attends within its attention chunk only: from the start of the
    chunk that holds position n_tokens - 1 (a whole chunk when n_tokens ends one), which every
    correct live cache holds (mlx-lm's maybe_trim_front keeps the last chunk_size positions).
    """
    if slot.cls == "ChunkedKVCache":
        return max(0, (n_tokens - 1) // slot.param("chunk_size") * slot.param("chunk_size"))
    return max(0, n_tokens - slot.param("max_size"))


def check_offsets(leaves: list[Any], slots: list[Slot], n_tokens: int) -> None:
    """Every positional leaf must have seen exactly the tokens it is saved with."""
    for i, (slot, c) in enumerate(zip(slots, leaves)):
        off = leaf_offset(c)
        if off is not None and off != n_tokens:
            raise StoreError(
                f"layer {i} ({slot.cls}) has seen {off} tokens but {n_tokens} token ids were given; "
                "a cache is saved with exactly the tokens it holds"
            )
