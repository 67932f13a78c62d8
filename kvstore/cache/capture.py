"""Capture what a finished cache no longer holds while a prefill passes through it.

- Sliding-window chunks: a finished `RotatingKVCache` holds only its last window, so a shared prefix
  of a Gemma-style model can only be rebuilt later if each chunk's keys and values were taken while
  they were in the window (`Capture.take` after each chunk-aligned prefill step).
- Recurrent-state checkpoints: an `ArraysCache` (hybrid and SSM models) holds one state that cannot
  be cut back, so a prefix is only restorable at a position whose state was copied while the prefill
  was there (`Capture.checkpoint`, at the boundaries `checkpoint_boundaries` picks).

Pass `capture.pieces` to `Store.save(..., captured=...)`: each piece is stored under the chunk key of
the prefix it belongs to, so agents that share that prefix share the piece.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import mlx.core as mx
import numpy as np

from kvstore.cache import codec
from kvstore.cache.keys import chunk_spans
from kvstore.ops.pieces import Piece

# Checkpoint policy (docs/ARCHITECTURE.md, "Recurrent-state checkpoints"): a state checkpoint of a
# 256-token boundary costs 9-12x the KV of that chunk on Qwen3-Next and Qwen3.5, so not every
# boundary gets one: the last boundary at or before each segment end (the system prompt, each message,
# each tool result: a position just after an end-of-turn token), and every CHECKPOINT_EVERY chunks
# inside a long segment, which bounds what a prefix diverging mid-segment recomputes.
CHECKPOINT_EVERY = 32


def checkpoint_boundaries(
    tokens: Sequence[int],
    start: int,
    end: int,
    chunk_size: int,
    turn_ends: Collection[int],
    every: int = CHECKPOINT_EVERY,
) -> list[int]:
    """Chunk boundaries in (start, end] at which a prefill of tokens[start:end] checkpoints its state.

    Each segment end (a position just after a token of `turn_ends`) gives the last chunk boundary at
    or before it; so does every `every`-th chunk boundary. Positions depend on the tokens only up
    to the boundary's segment end, so two agents whose prompts share a system prompt pick the same
    boundaries inside it (and prefill it in the same steps: equal states).
    """
    marks: set[int] = set()
    if end > start and turn_ends:
        seg = np.asarray(tokens[start:end])
        after = start + 1 + np.nonzero(np.isin(seg, np.fromiter(turn_ends, dtype=np.int64)))[0]
        marks.update(int(p) // chunk_size * chunk_size for p in after)
    if every > 0:
        stride = every * chunk_size
        marks.update(range((start // stride + 1) * stride, end + 1, stride))
    return sorted(b for b in marks if start < b <= end)


class Capture:
    """Pieces a prefill captures: sliding-window chunks (the fullest piece of each chunk) and
    recurrent-state checkpoints at the boundaries `boundaries` picks.

    `turn_ends` are the tokenizer's end-of-turn ids (segment ends for the checkpoint policy);
    `states` says whether the cache has state slots to checkpoint at all.
    """

    def __init__(self, chunk_size: int, *, turn_ends: Collection[int] = (), states: bool = False):
        self.chunk_size = chunk_size
        self.turn_ends = frozenset(int(t) for t in turn_ends)
        self.states = states
        self.pieces: dict[tuple[int, int], Piece] = {}

    @staticmethod
    def kinds(cache: list) -> set[str]:
        """The slot kinds of a cache: "kv", "rot" (sliding window), "state" (recurrent state)."""
        _tree, slots, _leaves = codec.describe(list(cache))
        return {s.kind for s in slots}

    def boundaries(self, tokens: Sequence[int], start: int, end: int) -> list[int]:
        """Where a prefill of tokens[start:end] must stop to take a state checkpoint (none without state slots)."""
        if not self.states:
            return []
        return checkpoint_boundaries(tokens, start, end, self.chunk_size, self.turn_ends)

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

    def checkpoint(self, cache: list, at: int) -> int:
        """Copy every state slot's state, which the cache holds after exactly `at` tokens (a chunk
        boundary); stored under the key of the chunk ending at `at`. Returns pieces taken."""
        if at <= 0 or at % self.chunk_size:
            raise ValueError(f"a state checkpoint is taken at a chunk boundary, not at {at}")
        _tree, slots, leaves = codec.describe(list(cache))
        chunk = at // self.chunk_size - 1
        taken = []
        for s, (slot, leaf) in enumerate(zip(slots, leaves)):
            if slot.kind != "state":
                continue
            arrays, meta = codec.extract_state(slot, leaf, at)
            piece = Piece(chunk, s, 0, {k: mx.array(v) for k, v in arrays.items()}, meta)
            self.pieces[(chunk, s)] = piece
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
