"""What an mlx-lm cache holds, read off its leaf caches: their arrays, their bytes, the tokens they have seen.

One home for these (issue 23): restore, the agent manager's turns, archive verification, kvstore.testing and
the benchmarks all ask here rather than each walking `keys` / `values` / `cache` their own way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import mlx.core as mx

from kvstore.cache import codec
from kvstore.errors import StoreError

__all__ = ["leaf_arrays", "arrays_of", "cache_tokens", "cache_nbytes"]


def leaf_arrays(leaf: Any) -> list[mx.array]:
    """The arrays one leaf cache holds: its keys and values (a tuple each when quantized) and its
    recurrent state (an ArraysCache's `cache` list); empty slots are skipped."""
    out: list[mx.array] = []
    for part in (getattr(leaf, "keys", None), getattr(leaf, "values", None), *(getattr(leaf, "cache", None) or ())):
        out += [a for a in (part if isinstance(part, (tuple, list)) else (part,)) if isinstance(a, mx.array)]
    return out


def arrays_of(leaves: Iterable[Any]) -> list[mx.array]:
    """Every array of the given leaf caches (to evaluate them in one `mx.eval`)."""
    return [a for leaf in leaves for a in leaf_arrays(leaf)]


def _leaves(cache: Sequence) -> list:
    _, _, leaves = codec.describe(list(cache))  # refuses classes the store cannot hold
    return leaves


def cache_tokens(cache: Sequence, default: int | None = None) -> int:
    """How many tokens an mlx-lm cache has seen (its layers' offset).

    A purely recurrent cache (mamba) does not count its tokens: `default` when given (what the
    caller fed it), else StoreError. Raises StoreError when its layers disagree.
    """
    offsets = {n for c in _leaves(cache) if (n := codec.leaf_offset(c)) is not None}
    if len(offsets) > 1:
        raise StoreError(f"the cache's layers have seen different numbers of tokens: {sorted(offsets)}")
    if not offsets:
        if default is not None:
            return default
        raise StoreError("this cache is recurrent state only: it does not count the tokens it has seen")
    return offsets.pop()


def cache_nbytes(cache: Sequence) -> int:
    """Bytes of the arrays an mlx-lm cache holds (allocated, growth padding included, as mlx-lm's `nbytes` counts them)."""
    total = 0
    for leaf in _leaves(cache):
        try:
            total += int(leaf.nbytes)
        except (AttributeError, TypeError):  # a class without `nbytes`: count its state's arrays
            total += sum(a.nbytes for a in leaf.state if isinstance(a, mx.array))
    return total
