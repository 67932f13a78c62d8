"""Synthetic mlx-lm caches for tests and benchmarks: random KV, or KV that is a function of the token prefix.

One generator serves the engine tests, the reliability suite and the benchmarks (it ships in the package, as
`numpy.testing` does, so each imports it without path set-up and a user can test their own code against it):

- `random_cache` / `model_cache` / `extend`: KVCache layers of seeded random KV, in any shape or in the real
  shapes of `SHAPES` (the benchmarks' caches);
- `make_cache`: every cache kind the codec stores (KV, quantized, rotating, arrays, cache lists), filled in
  prefill or decode-sized steps (the engine tests' caches);
- `prefix_cache` / `extend_prefix`: KV at position p derived from a hash chain over tokens[0..p], as a real
  model's KV depends on the whole prefix; equal prefixes give equal arrays in any process, so a restore of
  any token list can be checked against `expected_sum(tokens)` without the original cache (the reliability
  suite's caches);
- `same_cache` and `checksum`: bit-exact comparison of what two caches mean for the next step.
"""

from __future__ import annotations

import random
import struct

import mlx.core as mx
import numpy as np
import xxhash
from mlx_lm.models import cache as mlc

from kvstore.cache.leaves import arrays_of

# (layers, kv heads, head dim) of real models, for synthetic KV of the right size.
SHAPES = {
    "qwen2.5-0.5b": (24, 2, 64),
    "llama-3-8b": (32, 8, 128),
    "gemma-3-12b": (48, 8, 256),
}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
KINDS = ("kv", "quantized", "rotating", "arrays", "cachelist")


# -- random KV -----------------------------------------------------------------------------------------


def _random_kv(key, heads: int, n: int, dim: int, dtype) -> tuple[mx.array, mx.array]:
    """Keys and values (1, heads, n, dim) of standard normal noise."""
    k1, k2 = mx.random.split(key)
    return (
        mx.random.normal((1, heads, n, dim), key=k1).astype(dtype),
        mx.random.normal((1, heads, n, dim), key=k2).astype(dtype),
    )


def random_cache(
    n_tokens: int, *, layers: int = 2, heads: int = 2, dim: int = 8, dtype=mx.float16, seed: int = 0
) -> list:
    """`layers` KVCache layers holding n_tokens positions of seeded random KV (equal seeds, equal arrays)."""
    key = mx.random.key(seed)
    cache = []
    for _ in range(layers):
        key, sub = mx.random.split(key)
        c = mlc.KVCache()
        if n_tokens:
            c.update_and_fetch(*_random_kv(sub, heads, n_tokens, dim, dtype))
        cache.append(c)
    _eval(cache)
    return cache


def model_cache(shape: str, n_tokens: int, seed: int = 0, dtype=mx.bfloat16) -> list:
    """random_cache in the real shape of a model of `SHAPES`."""
    layers, heads, dim = SHAPES[shape]
    return random_cache(n_tokens, layers=layers, heads=heads, dim=dim, dtype=dtype, seed=seed)


def extend(cache: list, n_new: int, seed: int) -> list:
    """Append n_new positions of random KV to every KVCache layer, in place (a chat turn)."""
    key = mx.random.key(seed)
    for c in cache:
        key, sub = mx.random.split(key)
        _, heads, _, dim = c.keys.shape
        c.update_and_fetch(*_random_kv(sub, heads, n_new, dim, c.keys.dtype))
    _eval(cache)
    return cache


def kv_bytes(shape: str, n_tokens: int, itemsize: int = 2) -> int:
    """Bytes of KV that n_tokens take in a model of `SHAPES`."""
    layers, heads, dim = SHAPES[shape]
    return layers * 2 * heads * dim * n_tokens * itemsize


def feed(c, n: int, dtype, seed: int, n_heads: int = 2, dim: int = 8, steps: list[int] | None = None) -> None:
    """Append n positions to a positional cache in the given step sizes (mixing prefill and decode paths).

    steps=None appends all n at once; an empty list draws random step sizes; a list is consumed in order.
    """
    key = mx.random.key(seed)
    rng = random.Random(seed)
    done = 0
    while done < n:
        s = (steps.pop(0) if steps else rng.choice([1, 1, 3, 7, 16, 40])) if steps is not None else n
        s = min(s, n - done)
        key, sub = mx.random.split(key)
        c.update_and_fetch(*_random_kv(sub, n_heads, s, dim, dtype))
        done += s
    mx.eval(c.state if not isinstance(c, mlc.QuantizedKVCache) else [c.keys, c.values])


def make_cache(
    kind: str, n: int, dtype=mx.float16, layers: int = 3, seed: int = 0, window: int = 24, stepped: bool = False
) -> list:
    """A model-shaped cache list of `layers` layers of one of `KINDS` (plus KVCache layers for mixed kinds)."""
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
            raise ValueError(f"unknown cache kind {kind!r}: one of {', '.join(KINDS)}")
        out.append(c)
    return out


def tokens(n: int, seed: int = 0, vocab: int = 1000) -> list[int]:
    """n seeded random token ids."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# -- KV as a function of the token prefix ----------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
PREFIX_KINDS = ("kv", "kv", "rot", "quant")  # a layer kind each: KVCache, RotatingKVCache, QuantizedKVCache


def position_seeds(tokens: list[int]) -> np.ndarray:
    """One 64-bit seed per position, each a hash of the whole prefix up to it."""
    out = np.empty(len(tokens), dtype=np.uint64)
    h = 0
    for i, t in enumerate(tokens):
        h = xxhash.xxh3_64_intdigest(struct.pack("<QI", h, t))
        out[i] = h
    return out


def prefix_kv(tokens: list[int], layer: int, heads: int = 2, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (1, heads, n, dim) float32 for `tokens` at `layer` (splitmix64 of seed and index)."""
    seeds = position_seeds(tokens)
    lane = np.arange(heads * dim, dtype=np.uint64).reshape(heads, 1, dim)
    out = []
    for which in (1, 2):
        salt = np.uint64(layer * 131 + which * 17)
        with np.errstate(over="ignore"):
            x = seeds.reshape(1, -1, 1) ^ ((lane + salt * np.uint64(1 << 20)) * _GOLD)
            x ^= x >> np.uint64(30)
            x *= _M1
            x ^= x >> np.uint64(27)
            x *= _M2
            x ^= x >> np.uint64(31)
        vals = (x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)
        out.append((vals * 4).reshape(1, heads, len(tokens), dim))
    return out[0], out[1]


def _prefix_leaf(kind: str, window: int):
    if kind == "kv":
        return mlc.KVCache()
    if kind == "rot":
        return mlc.RotatingKVCache(max_size=window, keep=0)
    if kind == "quant":
        return mlc.QuantizedKVCache(group_size=32, bits=4)
    raise ValueError(f"unknown layer kind {kind!r}: one of kv, rot, quant")


def prefix_cache(tokens: list[int], kinds=PREFIX_KINDS, heads: int = 2, dim: int = 32, window: int = 24) -> list:
    """A cache that has seen exactly `tokens` in one prefill, a layer of each of `kinds`."""
    cache = [_prefix_leaf(k, window) for k in kinds]
    if tokens:
        for layer, c in enumerate(cache):
            k, v = prefix_kv(tokens, layer, heads, dim)
            c.update_and_fetch(mx.array(k), mx.array(v))
    _eval(cache)
    return cache


def extend_prefix(
    cache: list, old: list[int], new: list[int], rng: random.Random, heads: int = 2, dim: int = 32
) -> list:
    """Feed the positions of `new` past `old` into a prefix_cache (in place) in decode steps and prefill bursts."""
    assert new[: len(old)] == old
    arrays = [prefix_kv(new, layer, heads, dim) for layer in range(len(cache))]
    p = len(old)
    while p < len(new):
        step = min(len(new) - p, rng.choice([1, 1, 1, 2, 5, 9]))
        for c, (k, v) in zip(cache, arrays):
            c.update_and_fetch(mx.array(k[:, :, p : p + step]), mx.array(v[:, :, p : p + step]))
        p += step
    _eval(cache)
    return cache


def expected_sum(tokens: list[int], kinds=PREFIX_KINDS, heads: int = 2, dim: int = 32, window: int = 24) -> str:
    """The checksum any correct restore of a prefix_cache of `tokens` must have."""
    return checksum(prefix_cache(list(tokens), kinds, heads, dim, window))


# -- comparison ----------------------------------------------------------------------------------------


def _eval(cache: list) -> None:
    arrays = arrays_of(cache)
    if arrays:
        mx.eval(arrays)


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


def _chunked_window(c):
    """Keys/values of the attention chunk position offset - 1 lies in: all a ChunkedKVCache's next step
    can attend to (codec.window_start)."""
    if c.keys is None or c.offset == 0:
        return None, None
    k, v = c.keys_and_values()
    keep = c.offset - (c.offset - 1) // c.chunk_size * c.chunk_size
    return k[..., k.shape[2] - keep :, :], v[..., v.shape[2] - keep :, :]


def _eq(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


def same_leaf(a, b) -> bool:
    """Whether two cache layers mean the same to the next step, bit for bit."""
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
    if isinstance(a, mlc.ChunkedKVCache):
        (ka, va), (kb, vb) = _chunked_window(a), _chunked_window(b)
        return _eq(ka, kb) and _eq(va, vb) and a.chunk_size == b.chunk_size
    if a.keys is None or b.keys is None:
        return a.keys is None and b.keys is None or a.offset == 0
    if isinstance(a, mlc.QuantizedKVCache):
        return (a.bits, a.group_size) == (b.bits, b.group_size) and all(
            _eq(x[..., : a.offset, :], y[..., : b.offset, :]) for x, y in zip(a.keys + a.values, b.keys + b.values)
        )
    return _eq(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :]) and _eq(
        a.values[..., : a.offset, :], b.values[..., : b.offset, :]
    )


def same_cache(a: list, b: list) -> bool:
    """Whether two cache lists mean the same to the next step, bit for bit."""
    return len(a) == len(b) and all(same_leaf(x, y) for x, y in zip(a, b))


def canonical(cache: list) -> list[np.ndarray]:
    """What a cache means for the next step: used positions of each layer, a rotating layer's window."""
    out = []
    for c in cache:
        out.append(np.array([c.offset], dtype=np.int64))
        if c.keys is None:
            continue
        if isinstance(c, mlc.QuantizedKVCache):
            out += [np.array(a[..., : c.offset, :]) for a in (*c.keys, *c.values)]
        elif isinstance(c, mlc.RotatingKVCache):
            k, v = _window(c)
            out += [np.array(k), np.array(v), np.array([c.max_size])]
        elif isinstance(c, mlc.ChunkedKVCache):
            k, v = _chunked_window(c)
            out += [np.array(k), np.array(v), np.array([c.chunk_size])]
        else:
            out += [np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])]
    return out


def checksum(cache: list) -> str:
    """A digest of `canonical(cache)`: equal digests mean bit-identical caches."""
    h = xxhash.xxh3_128()
    for a in canonical(cache):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
