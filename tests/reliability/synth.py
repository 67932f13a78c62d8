"""Synthetic caches whose KV is a pure function of the token prefix, so any restore can be checked.

Position p of every layer holds values derived from a hash chain over tokens[0..p] (as a real
model's KV depends on the whole prefix). Equal prefixes give equal arrays in any process, so agents
that share a prompt share chunks, and a restored cache of any token list can be compared bit for bit
with `expected_sum(tokens)` without keeping the original cache around.
"""

from __future__ import annotations

import random
import struct

import mlx.core as mx
import numpy as np
import xxhash
from mlx_lm.models import cache as mlc

FP = "5e" * 16            # model fingerprint of the synthetic model
OTHER_FP = "a7" * 16      # another model, for mismatch tests
CHUNK = 16                # store chunk size: short token lists still span several chunks
HEADS, DIM = 2, 32
WINDOW = 24               # sliding-window size of the rotating layer
KINDS = ("kv", "kv", "rot", "quant")
PREFIXES = [[random.Random(1000 + i).randrange(5000) for _ in range(n)] for i, n in enumerate((40, 23, 50))]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def position_seeds(tokens: list[int]) -> np.ndarray:
    """One 64-bit seed per position, each a hash of the whole prefix up to it."""
    out = np.empty(len(tokens), dtype=np.uint64)
    h = 0
    for i, t in enumerate(tokens):
        h = xxhash.xxh3_64_intdigest(struct.pack("<QI", h, t))
        out[i] = h
    return out


def kv_numpy(tokens: list[int], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (1, HEADS, n, DIM) float32 for `tokens` at `layer` (splitmix64 of seed and index)."""
    seeds = position_seeds(tokens)
    lane = np.arange(HEADS * DIM, dtype=np.uint64).reshape(HEADS, 1, DIM)
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
        out.append((vals * 4).reshape(1, HEADS, len(tokens), DIM))
    return out[0], out[1]


def _new_leaf(kind: str):
    if kind == "kv":
        return mlc.KVCache()
    if kind == "rot":
        return mlc.RotatingKVCache(max_size=WINDOW, keep=0)
    return mlc.QuantizedKVCache(group_size=32, bits=4)


def make_cache(tokens: list[int], kinds=KINDS) -> list:
    """A cache that has seen exactly `tokens` in one prefill."""
    cache = [_new_leaf(k) for k in kinds]
    if tokens:
        for layer, c in enumerate(cache):
            k, v = kv_numpy(tokens, layer)
            c.update_and_fetch(mx.array(k), mx.array(v))
    _eval(cache)
    return cache


def extend(cache: list, old: list[int], new: list[int], rng: random.Random) -> list:
    """Feed the positions of `new` past `old` into `cache` (in place) in decode steps and prefill bursts."""
    assert new[: len(old)] == old
    arrays = [kv_numpy(new, layer) for layer in range(len(cache))]
    p = len(old)
    while p < len(new):
        step = min(len(new) - p, rng.choice([1, 1, 1, 2, 5, 9]))
        for c, (k, v) in zip(cache, arrays):
            c.update_and_fetch(mx.array(k[:, :, p : p + step]), mx.array(v[:, :, p : p + step]))
        p += step
    _eval(cache)
    return cache


def _eval(cache: list) -> None:
    arrays = []
    for c in cache:
        if c.keys is None:
            continue
        arrays += list(c.keys) + list(c.values) if isinstance(c.keys, tuple) else [c.keys, c.values]
    if arrays:
        mx.eval(arrays)


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
            if c.offset < c.keys.shape[2]:
                k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            else:
                k, v = c._temporal_order(c.keys), c._temporal_order(c.values)
            keep = min(c.offset, c.max_size)
            out += [np.array(k[..., -keep:, :]), np.array(v[..., -keep:, :]), np.array([c.max_size])]
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


def expected_sum(tokens: list[int], kinds=KINDS) -> str:
    """The checksum any correct restore of `tokens` must have."""
    return checksum(make_cache(list(tokens), kinds))


def agent_tokens(rng: random.Random, max_suffix: int = 40) -> list[int]:
    """A shared system prompt (cut at a random length) and a random user part."""
    prefix = rng.choice(PREFIXES)
    return prefix[: rng.randint(len(prefix) // 2, len(prefix))] + [rng.randrange(5000)
                                                                   for _ in range(rng.randint(0, max_suffix))]
