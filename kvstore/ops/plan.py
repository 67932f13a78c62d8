"""The restore planner: which stored pieces rebuild each layer of a cache at a length. Typed rows in, a typed plan out.

Pure: no I/O, no SQL (kvstore.index.reads_restore fetches the rows, kvstore.ops.restore reads the blobs).
The policy, in the order the planner applies it:

- A prefix ends at a chunk boundary (or at the end of a stored partial chunk the request continues).
- A full-attention layer (`kv`) needs every chunk from 0: the match can go no further than the first
  chunk that lacks one of its pieces.
- A sliding-window layer (`rot`) needs only the chunks of its window before the prefix's end, and each
  piece must hold the positions of the window it covers (a piece may lack a chunk's first tokens).
- A recurrent-state layer (`state`) is rebuilt only from a checkpoint stored under the key of the chunk
  the prefix ends, taken at exactly that position.
- The longest boundary at which every layer can be rebuilt wins; a hash match is never trusted alone:
  the stored token ids of a snapshot listing the prefix's last chunk must agree with the request's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import xxhash

from kvstore.cache import codec
from kvstore.index.rows import Layers, Piece, TailRow

__all__ = [
    "Piece",
    "Layers",
    "Read",
    "Plan",
    "Chain",
    "Found",
    "TailRow",
    "Tail",
    "plan",
    "longest",
    "last_chunk",
    "tail_parents",
    "verified_tails",
    "extend_by_tail",
    "agreeing",
]

Span = tuple[int, int]  # (first position, tokens) of a chunk


# One blob a layer is rebuilt from: (its id, the leading chunk tokens it lacks, the chunk's first position).
# A plain tuple for the reason index.rows.Piece is one: a plan holds one per chunk and layer.
Read = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Plan:
    """What rebuilds a cache at n_tokens: per slot (layer), the blobs to read, in position order."""

    n_tokens: int
    reads: tuple[tuple[Read, ...], ...]

    def blob_ids(self) -> set[str]:
        return {blob_id for reads in self.reads for blob_id, _first, _start in reads}


class Chain(NamedTuple):
    """A request's chunks as far as they were matched: keys, spans, the pieces stored for them, the match length."""

    keys: list[bytes]
    spans: list[Span]
    layers: Layers
    n_tokens: int


@dataclass(frozen=True, slots=True)
class Found:
    """A match's plan and the cache layout it rebuilds (`match`'s second value)."""

    tree: Any  # the cache list's nesting (codec.layout_from_json)
    slots: list  # codec slots, one per leaf cache
    plan: Plan


class Tail(NamedTuple):
    """A stored partial chunk whose tokens the request continues: it would end the match at `end`."""

    end: int
    chunk: int  # its position in the request's chunk chain
    key: bytes
    length: int


def last_chunk(spans: Sequence[Span], n_tokens: int) -> int:
    """The index of the chunk that ends at n_tokens."""
    return next(i for i, (s, ln) in enumerate(spans) if s + ln == n_tokens)


def plan(slots, keys: Sequence[bytes], spans: Sequence[Span], n_tokens: int, layers: Layers) -> Plan | None:
    """Per slot, the blobs that rebuild it at n_tokens; None if one is missing."""
    if n_tokens == 0:
        return Plan(0, tuple(() for _ in slots))
    last = last_chunk(spans, n_tokens)
    out: list[tuple[Read, ...]] = []
    for s, slot in enumerate(slots):
        if slot.kind == "state":
            hit = layers.get((keys[last], s))
            if hit is None:
                return None
            out.append(((hit[0], 0, spans[last][0]),))
            continue
        need_from = codec.window_start(slot, n_tokens) if slot.kind == "rot" else 0
        got = []
        for i in range(last + 1):
            start, length = spans[i]
            if start + length <= need_from:
                continue
            hit = layers.get((keys[i], s))
            if hit is None or start + hit[1] > max(need_from, start):
                return None
            got.append((hit[0], hit[1], start))
        out.append(tuple(got))
    return Plan(n_tokens, tuple(out))


def longest(slots, keys: Sequence[bytes], spans: Sequence[Span], layers: Layers, n_max: int | None = None) -> int:
    """The longest chunk end (at most n_max) at which every slot can be rebuilt.

    A state slot (recurrent state) is rebuilt only from a checkpoint stored under the key of the
    chunk the position ends: a hybrid model's prefix lands on the longest boundary that has every
    attention chunk and a checkpoint of every state slot. Boundaries without one are skipped before
    the full plan is tried (a long prefix has checkpoints at a few boundaries only).
    """
    limit = len(spans)
    for s, slot in enumerate(slots):  # a full-attention slot needs an unbroken run from chunk 0
        if slot.kind == "kv":
            i = 0
            while i < limit and (keys[i], s) in layers:
                i += 1
            limit = i
    states = [s for s, slot in enumerate(slots) if slot.kind == "state"]
    for i in range(limit - 1, -1, -1):
        n = spans[i][0] + spans[i][1]
        if (n_max is not None and n > n_max) or any((keys[i], s) not in layers for s in states):
            continue
        if plan(slots, keys, spans, n, layers) is not None:
            return n
    return 0


def tail_parents(model: str, keys: Sequence[bytes], n_tokens: int, n_request: int, chunk_size: int) -> dict[bytes, int]:
    """{parent key: chunk index j} of the partial chunks that could extend a match of n_tokens.

    An agent saved at 149 tokens keys its last 5 tokens as a chunk of its own; a longer request
    chunks them into a full chunk with another key. Chunks record their parent, so a stored tail is
    found by its parent. It is looked for after every chunk boundary from n_tokens on, not only after
    n_tokens: a sliding-window cache saved after a plain prefill can rebuild no earlier boundary (its
    window chunks were never captured), only its whole length (issue 15, item 3: a Gemma-style
    continuation restored nothing). The tail after boundary j * chunk_size is chunk j, its parent
    keys[j - 1] (the model for j = 0).
    """
    full = n_request // chunk_size
    return {(keys[j - 1] if j else bytes.fromhex(model)): j for j in range(n_tokens // chunk_size, full + 1)}


def verified_tails(
    parents: dict[bytes, int], rows: Iterable[TailRow], toks: np.ndarray, n_tokens: int, chunk_size: int
) -> list[Tail]:
    """The stored tails that end past n_tokens and whose key re-hashes over the request's tokens, longest first."""
    tails = []
    for row in rows:
        j = parents[row.parent]
        if row.seq == j:
            tails.append((j * chunk_size + row.length, j, row.key, row.length, row.parent))
    out = []
    for end, j, key, length, parent in sorted(tails, reverse=True):
        start = j * chunk_size
        if end <= n_tokens or end > toks.size or xxhash.xxh3_128_digest(parent + toks[start:end].tobytes()) != key:
            continue
        out.append(Tail(end, j, key, length))
    return out


def extend_by_tail(slots, chain: Chain, tails: Iterable[Tail], tail_layers: Layers) -> Chain:
    """The chain ended by the first of `tails` (longest first) at which every slot can be rebuilt, else `chain`."""
    for tail in tails:
        j = tail.chunk
        alt_keys = chain.keys[:j] + [tail.key]
        alt_spans = chain.spans[:j] + [(tail.end - tail.length, tail.length)]
        alt_layers = {**chain.layers, **tail_layers}
        if plan(slots, alt_keys, alt_spans, tail.end, alt_layers) is not None:
            return Chain(alt_keys, alt_spans, alt_layers, tail.end)
    return chain


def agreeing(stored: np.ndarray | None, toks: np.ndarray, spans: Sequence[Span], n_tokens: int) -> int:
    """How many of the first n_tokens of `toks` agree with `stored`, the token ids of a snapshot that lists
    the chunk ending at n_tokens (None: no snapshot lists it)."""
    if stored is None:
        # No snapshot lists this chunk any more (its agent was deleted, gc has not run yet): an earlier
        # chunk may still be listed by another agent's snapshot, so look again one chunk shorter.
        return spans[last_chunk(spans, n_tokens)][0]
    n = n_tokens
    stored = stored[:n]
    mine = toks[:n]
    if stored.size == n and (stored == mine).all():
        return n
    diff = (stored[: min(stored.size, n)] != mine[: min(stored.size, n)]).nonzero()[0]
    return int(diff[0]) if diff.size else int(min(stored.size, n))
