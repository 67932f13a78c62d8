"""Checking the KV of an mlx-lm prompt-cache file against the model it is imported for.

A file's metadata proves nothing about its arrays: anyone can write a file whose token ids, model
name or kvstore metadata are wrong (issue 25, items 1, 2 and 5). Two levels of checking:

- `check_layers`, always: the layer count, each layer's cache class, batch size, head count, key and
  value head sizes and dtype equal those of the cache the model itself makes (probed with one
  token), and every value is finite. A file that fails is refused, naming the file and the layer.
- `verify_kv`, on request: the given token ids are prefilled with the model (in the store's
  chunk-aligned steps, as the agent manager does) and every layer's keys and values are compared with
  the file's within TOLERANCE, a relative L2 error per array (the one archive imports verify with).
  Only then does KV from a file join the store's shared chunks (kvstore.mlxfile).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvstore.cache.keys import chunk_spans
from kvstore.errors import StoreError, TokenMismatchError
from kvstore.ops.archive_verify import TOLERANCE

__all__ = ["MlxCacheFileError", "LayerShape", "model_layers", "check_layers", "verify_kv", "TOLERANCE"]


class MlxCacheFileError(StoreError, ValueError):
    """The file is not an mlx-lm prompt-cache file kvstore can read, or not one of the model's."""


@dataclass(frozen=True)
class LayerShape:
    """What one layer of the model's own cache holds."""

    cls: str  # the mlx-lm cache class, e.g. "KVCache"
    heads: int  # KV heads (0 for a layer that holds no keys)
    key_size: int  # the size of one key head
    value_size: int  # the size of one value head
    dtype: str  # the keys' and values' dtype, e.g. "float32"


def model_layers(model: Any) -> list[LayerShape]:
    """The model's cache layers, from the cache it makes for one token (cheap: one forward step)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    shapes = []
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if isinstance(keys, mx.array) and isinstance(values, mx.array):
            shapes.append(LayerShape(type(c).__name__, keys.shape[1], keys.shape[3], values.shape[3], _name(keys)))
        else:
            shapes.append(LayerShape(type(c).__name__, 0, 0, 0, ""))
    return shapes


def _layer(path: Path, i: int, reason: str) -> MlxCacheFileError:
    return MlxCacheFileError(f"{path} layer {i}: {reason}; nothing was imported")


def _name(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def check_layers(path: Path, cache: list, want: list[LayerShape]) -> None:
    """Refuse (MlxCacheFileError naming file and layer) unless every layer of `cache` has the model's
    class, shapes and dtype and holds only finite values."""
    if len(cache) != len(want):
        raise MlxCacheFileError(f"{path} holds {len(cache)} layers, the model has {len(want)}")
    for i, (c, w) in enumerate(zip(cache, want)):
        if type(c).__name__ != w.cls:
            raise _layer(path, i, f"it is a {type(c).__name__}, the model keeps a {w.cls} there")
        for what, a, size in (("keys", c.keys, w.key_size), ("values", c.values, w.value_size)):
            if _name(a) != w.dtype:
                raise _layer(path, i, f"its {what} are {_name(a)}, the model computes {w.dtype}")
            if a.shape[0] != 1:
                raise _layer(path, i, f"its {what} hold a batch of {a.shape[0]}; only a batch of 1 imports")
            if a.shape[1] != w.heads:
                raise _layer(path, i, f"its {what} have {a.shape[1]} heads, the model has {w.heads}")
            if a.shape[3] != size:
                raise _layer(path, i, f"its {what} heads are {a.shape[3]} wide, the model's are {size}")
            if not bool(mx.all(mx.isfinite(a)).item()):
                raise _layer(path, i, f"its {what} hold values that are not finite (NaN or infinity)")


def _relative_error(live: mx.array, stored: mx.array) -> float:
    a = np.asarray(live.astype(mx.float32))
    b = np.asarray(stored.astype(mx.float32))
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-6)


def verify_kv(path: Path, cache: list, tokens: list[int], model: Any, chunk_size: int) -> float:
    """Prefill `tokens` with `model` and compare every layer with `cache`; the largest relative error.

    Raises TokenMismatchError naming the file and the first layer past TOLERANCE.
    """
    from mlx_lm.models.cache import make_prompt_cache

    live = make_prompt_cache(model)
    ids = np.asarray(tokens, dtype=np.int32)
    for start, length in chunk_spans(len(tokens), chunk_size):
        model(mx.array(ids[start : start + length])[None], cache=live)
        mx.eval([a for c in live for a in (c.keys, c.values)])  # one step at a time, not one lazy graph
    largest = 0.0
    n = len(tokens)
    for i, (mine, theirs) in enumerate(zip(live, cache)):
        for what, a, b in (("keys", mine.keys, theirs.keys), ("values", mine.values, theirs.values)):
            error = _relative_error(a[..., :n, :], b[..., :n, :])
            if not error <= TOLERANCE:
                raise TokenMismatchError(
                    f"{path} layer {i}: its {what} are not what the model computes from the given token ids "
                    f"(relative error {error:.3g}, tolerance {TOLERANCE:g}); nothing was imported "
                    "(import it without verification to keep it private to its agent)"
                )
            largest = max(largest, error)
    return largest
