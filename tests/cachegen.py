"""Real mlx-lm cache objects filled with random KV, and a bit-exact comparison, for engine tests."""

from __future__ import annotations

import random

import mlx.core as mx
from mlx_lm.models import cache as mlc

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
KINDS = ("kv", "quantized", "rotating", "arrays", "cachelist")


def _kv(n_heads, n, dim, dtype, key):
    k1, k2 = mx.random.split(key)
    return (mx.random.normal((1, n_heads, n, dim), key=k1).astype(dtype),
            mx.random.normal((1, n_heads, n, dim), key=k2).astype(dtype))


def feed(c, n: int, dtype, seed: int, n_heads: int = 2, dim: int = 8, steps: list[int] | None = None) -> None:
    """Append n positions to a positional cache in the given step sizes (mixing prefill and decode paths)."""
    key = mx.random.key(seed)
    rng = random.Random(seed)
    done = 0
    while done < n:
        s = (steps.pop(0) if steps else rng.choice([1, 1, 3, 7, 16, 40])) if steps is not None else n
        s = min(s, n - done)
        key, sub = mx.random.split(key)
        k, v = _kv(n_heads, s, dim, dtype, sub)
        c.update_and_fetch(k, v)
        done += s
    mx.eval(c.state if not isinstance(c, mlc.QuantizedKVCache) else [c.keys, c.values])


def make_cache(kind: str, n: int, dtype=mx.float16, layers: int = 3, seed: int = 0, window: int = 24,
               stepped: bool = False) -> list:
    """A model-shaped cache list of `layers` layers of one kind (plus a KVCache layer for mixed kinds)."""
    steps = [] if stepped else None
    out = []
    for layer in range(layers):
        s = seed * 100 + layer
        if kind == "kv":
            c = mlc.KVCache()
            feed(c, n, dtype, s, steps=steps)
        elif kind == "quantized":
            c = mlc.QuantizedKVCache(group_size=32, bits=8 if layer % 2 else 4)
            feed(c, n, dtype, s, dim=64, steps=steps)
        elif kind == "rotating":
            c = mlc.RotatingKVCache(max_size=window) if layer % 2 == 0 else mlc.KVCache()
            feed(c, n, dtype, s, steps=[] if layer % 2 == 0 else steps)
        elif kind == "arrays":
            c = mlc.ArraysCache(2)
            if n:
                c[0] = mx.random.normal((1, 3, 4), key=mx.random.key(s)).astype(dtype)
                c[1] = mx.random.normal((1, 2, 8), key=mx.random.key(s + 1)).astype(dtype)
        elif kind == "cachelist":
            conv = mlc.ArraysCache(1)
            if n:
                conv[0] = mx.random.normal((1, 3, 4), key=mx.random.key(s)).astype(dtype)
            kv = mlc.KVCache()
            feed(kv, n, dtype, s, steps=steps)
            c = mlc.CacheList(conv, kv)
        else:
            raise ValueError(kind)
        out.append(c)
    return out


def _window(c):
    """Temporal-order keys/values of the positions a rotating cache's next step can attend to."""
    if c.keys is None:
        return None, None
    if c.offset < c.keys.shape[2]:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    else:
        k, v = c._temporal_order(c.keys), c._temporal_order(c.values)
    keep = min(c.offset, c.max_size)
    return k[..., -keep:, :], v[..., -keep:, :]


def _eq(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


def same_leaf(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, mlc.CacheList):
        return len(a.caches) == len(b.caches) and all(same_leaf(x, y) for x, y in zip(a.caches, b.caches))
    if isinstance(a, mlc.ArraysCache):
        return len(a.cache) == len(b.cache) and all(_eq(x, y) for x, y in zip(a.cache, b.cache))
    if a.offset != b.offset:
        return False
    if isinstance(a, mlc.RotatingKVCache):
        (ka, va), (kb, vb) = _window(a), _window(b)
        return _eq(ka, kb) and _eq(va, vb) and a.max_size == b.max_size and a.keep == b.keep
    if a.keys is None or b.keys is None:
        return a.keys is None and b.keys is None or a.offset == 0
    if isinstance(a, mlc.QuantizedKVCache):
        return (a.bits, a.group_size) == (b.bits, b.group_size) and all(
            _eq(x[..., : a.offset, :], y[..., : b.offset, :]) for x, y in zip(a.keys + a.values, b.keys + b.values))
    return _eq(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :]) and \
        _eq(a.values[..., : a.offset, :], b.values[..., : b.offset, :])


def same_cache(a: list, b: list) -> bool:
    return len(a) == len(b) and all(same_leaf(x, y) for x, y in zip(a, b))


def tokens(n: int, seed: int = 0, vocab: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]
