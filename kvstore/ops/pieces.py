"""What a save writes: the pieces (a chunk's positions of one layer) of a live cache, and of a prefill's
captures, that the index lacks or holds less of. Pure planning over the cache and the index's rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from kvstore.blob import tensorfile
from kvstore.cache import codec
from kvstore.index.layers import StoredLayers

__all__ = ["Piece", "plan_pieces"]


@dataclass
class Piece:
    """KV of one (chunk, slot): positions [chunk start + first, chunk end)."""

    chunk: int
    slot: int
    first: int
    arrays: dict
    meta: dict | None = None


def _host_views(slot: codec.Slot, leaf: Any) -> tuple[dict[str, mx.array], int]:
    """A positional leaf's arrays by name, and the position of their index 0."""
    if slot.cls == "QuantizedKVCache":
        named = {f"{p}{i}": part for p, parts in (("k", leaf.keys), ("v", leaf.values)) for i, part in enumerate(parts)}
        return named, 0
    if slot.kind == "rot":
        keys, values = codec.rotating_arrays(leaf)
        return {"k": keys, "v": values}, codec.held_range(slot, leaf)[0]
    return {"k": leaf.keys, "v": leaf.values}, 0


def _host_arrays(slots, leaves, wanted: list[int]) -> dict[int, tuple[dict[str, tensorfile.HostArray], int]]:
    """Zero-copy host views of the wanted slots' arrays after one evaluation for all of them (an
    evaluation per layer costs ~0.07 ms, a millisecond or two of a small save)."""
    views = {s: _host_views(slots[s], leaves[s]) for s in wanted}
    mx.eval([a for named, _lo in views.values() for a in named.values()])
    return {s: ({n: tensorfile.host(a) for n, a in named.items()}, lo) for s, (named, lo) in views.items()}


def _slice(arrays: dict[str, tensorfile.HostArray], a: int, b: int) -> dict[str, tensorfile.HostArray]:
    return {n: h.positions(a, b) for n, h in arrays.items()}


def plan_pieces(
    slots,
    leaves,
    *,
    n_tokens: int,
    chunk_size: int,
    keys: list[bytes],
    have: Mapping[tuple[bytes, int], int],
    captured: dict | None,
) -> list[Piece]:
    """Pieces of the live cache (and captured during prefill) that the index lacks or holds less of."""
    n_chunks = -(-n_tokens // chunk_size)

    def span(i: int) -> tuple[int, int]:  # (start, length) of chunk i, as chunk_spans has it, without the list
        return i * chunk_size, min(chunk_size, n_tokens - i * chunk_size)

    # Chunks the index holds whole need nothing: a turn plans over its new chunks only (kvstore.index.layers).
    todo = have.unfilled(keys[:n_chunks]) if isinstance(have, StoredLayers) else range(n_chunks)
    want: dict[tuple[int, int], Piece] = {}
    missing: dict[int, list[tuple[int, int]]] = {}  # slot -> [(chunk, first)] the index lacks
    for s, (slot, leaf) in enumerate(zip(slots, leaves)):
        if slot.kind == "state":
            if n_chunks and (keys[-1], s) not in have:
                arrays, meta = codec.extract_state(slot, leaf, n_tokens)
                want[(n_chunks - 1, s)] = Piece(n_chunks - 1, s, 0, arrays, meta)
            continue
        lo, hi = codec.held_range(slot, leaf)
        for i in todo:
            start, length = span(i)
            end = start + length
            if end <= lo or start >= hi:
                continue
            first = max(start, lo) - start
            if have.get((keys[i], s), length + 1) > first:
                missing.setdefault(s, []).append((i, first))
    hosts = _host_arrays(slots, leaves, list(missing)) if missing else {}
    for s, pieces in missing.items():
        host, base = hosts[s]
        for i, first in pieces:
            start, length = span(i)
            want[(i, s)] = Piece(i, s, first, _slice(host, start + first - base, start + length - base))
    for (i, s), piece in (captured or {}).items():
        if i >= n_chunks:
            continue
        best = want.get((i, s))
        if have.get((keys[i], s), span(i)[1] + 1) > piece.first and (best is None or best.first > piece.first):
            want[(i, s)] = piece
    return sorted(want.values(), key=lambda p: (p.slot, p.chunk))
