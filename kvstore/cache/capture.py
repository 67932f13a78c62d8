"""Capture sliding-window chunks while a prefill passes through them.

A finished `RotatingKVCache` holds only its last window, so a shared prefix of a Gemma-style model
can only be rebuilt later if each chunk's keys and values were taken while they were in the
window. Prefill in chunk-aligned steps and call `Capture.take(cache)` after each step; pass
`capture.pieces` to `Store.save(..., captured=...)`.
"""

from __future__ import annotations

import mlx.core as mx

from kvstore.cache import codec
from kvstore.cache.keys import chunk_spans
from kvstore.ops.save import Piece


class Capture:
    """Collects (chunk, slot) pieces of sliding-window layers, the fullest piece of each chunk."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.pieces: dict[tuple[int, int], Piece] = {}

    def needed(self, cache: list) -> bool:
        """Whether the cache has sliding-window layers at all (else capture is a no-op)."""
        _tree, slots, _leaves = codec.describe(list(cache))
        return any(s.kind == "rot" for s in slots)

    def take(self, cache: list) -> int:
        """Copy every chunk the rotating layers now hold in full (or fuller than before). Returns pieces taken."""
        _tree, slots, leaves = codec.describe(list(cache))
        taken = []
        for s, (slot, leaf) in enumerate(zip(slots, leaves)):
            if slot.kind != "rot" or leaf.keys is None:
                continue
            lo, hi = codec.held_range(slot, leaf)
            for i, (start, length) in enumerate(chunk_spans(hi, self.chunk_size)):
                end = start + length
                if end <= lo or length < self.chunk_size:
                    continue  # a partial tail chunk is saved from the live cache at save time
                first = max(start, lo) - start
                old = self.pieces.get((i, s))
                if old is not None and old.first <= first:
                    continue
                # Copies, not views: the rotating buffer is overwritten in place by later steps.
                arrays = {k: mx.array(v) for k, v in codec.extract(slot, leaf, start + first, end).items()}
                piece = Piece(i, s, first, arrays)
                self.pieces[(i, s)] = piece
                taken.append(piece)
        if taken:
            mx.eval([a for p in taken for a in p.arrays.values()])
        return len(taken)

    def drop_from(self, n_tokens: int) -> None:
        """Forget pieces of chunks that end past n_tokens (the history was trimmed back)."""
        for key in [k for k in self.pieces if (k[0] + 1) * self.chunk_size > n_tokens]:
            del self.pieces[key]

    def nbytes(self) -> int:
        return sum(a.nbytes for p in self.pieces.values() for a in p.arrays.values())
