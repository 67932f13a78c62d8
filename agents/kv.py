"""KV-cache quantization for an agent manager: mlx-lm's kv_bits, kv_group_size and quantized_kv_start.

mlx-lm (generate, server) keeps a cache in full precision until it has seen `quantized_kv_start`
tokens, then replaces each KVCache layer by a QuantizedKVCache before the next model call
(`maybe_quantize_kv_cache`). kvstore applies the same rule at the same points (before every
prefill step and every generated token) and stores each cache as what it is, never converted:

- a quantized cache under the fingerprint of the model *and* these settings;
- a cache that has not reached quantized_kv_start yet under a second fingerprint of the same
  settings (phase "full-precision"): its values are what the unquantized model computes, but it
  is kept apart from plain full-precision caches, so a cache of one kv setting never reaches another.

An agent moves from the second fingerprint to the first when its cache is quantized (`Store.save`'s
`moves_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

from kvstore.cache import codec
from kvstore.errors import ModelMismatchError, UnsupportedCacheError

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize takes
GROUP_SIZES = (32, 64, 128)
FULL_PRECISION = "full-precision"


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's KV quantization settings (same names and defaults as `mlx_lm.generate`)."""

    bits: int
    group_size: int = 64
    start: int = DEFAULT_QUANTIZED_KV_START  # mlx-lm's quantized_kv_start

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"kv_bits must be one of {', '.join(map(str, BITS))}, not {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"kv_group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size!r}"
            )
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"quantized_kv_start must be a whole number >= 0, not {self.start!r}")

    def fingerprints(self, fingerprint_of) -> tuple[str, str]:
        """(quantized, full-precision) fingerprints, from `fingerprint_of(**kv settings)`."""
        kw = dict(kv_bits=self.bits, kv_group_size=self.group_size, quantized_kv_start=self.start)
        return fingerprint_of(**kw), fingerprint_of(**kw, kv_phase=FULL_PRECISION)

    def apply(self, cache: list) -> None:
        """mlx-lm's maybe_quantize_kv_cache: quantize the KVCache layers of a cache that has reached `start`."""
        for i, c in enumerate(cache):
            if type(c) is codec.mlc.KVCache and c.offset >= self.start:
                cache[i] = c.to_quantized(group_size=self.group_size, bits=self.bits)

    def generate_kwargs(self) -> dict:
        """The settings as mlx_lm.generate.generate_step takes them."""
        return dict(kv_bits=self.bits, kv_group_size=self.group_size, quantized_kv_start=self.start)


def check_model(model: Any, cache: list, group_size: int) -> None:
    """Refuse a model whose cache mlx-lm cannot quantize: sliding-window layers (NotImplementedError
    there), or heads whose size the group size does not divide (found with one token, not mid-turn)."""
    _tree, slots, leaves = codec.describe(list(cache))
    if any(s.cls == "RotatingKVCache" for s in slots):
        raise UnsupportedCacheError(
            "kv_bits needs a model whose attention layers use KVCache: mlx-lm cannot quantize a "
            "sliding-window layer (RotatingKVCache)"
        )
    if not any(s.cls == "KVCache" for s in slots):
        raise UnsupportedCacheError("kv_bits: this model's cache has no KVCache layer to quantize")
    import mlx.core as mx

    mx.eval(model(mx.array([[0]]), cache=cache))
    sizes = {a.shape[-1] for c in leaves if type(c) is codec.mlc.KVCache for a in (c.keys, c.values)}
    if any(size % group_size for size in sizes):
        raise UnsupportedCacheError(
            f"kv_group_size {group_size} does not divide this model's head sizes {sorted(sizes)}: "
            "mlx-lm quantizes each head's keys and values in groups of that many"
        )


def is_quantized(cache: list) -> bool:
    """Whether any layer of the cache is a QuantizedKVCache."""
    _tree, slots, _leaves = codec.describe(list(cache))
    return any(s.cls == "QuantizedKVCache" for s in slots)


def settings(kv_bits: int | None, kv_group_size: int, quantized_kv_start: int) -> KVQuantization | None:
    """The settings for an AgentManager's arguments (None: full precision, kv_group_size ignored as in mlx-lm)."""
    if kv_bits is None:
        return None
    return KVQuantization(kv_bits, kv_group_size, quantized_kv_start)


class CacheKeys:
    """The fingerprints an agent manager's caches are stored under, and the store reads that pick one.

    Without kv_bits: the model's own. With it: the quantized caches' (`primary`) and the
    full-precision caches' of the same settings; an agent belongs to one of them at a time.
    """

    def __init__(self, handle: Any, store: Any, kv: KVQuantization | None):
        self.handle, self.store, self.kv = handle, store, kv
        self.all: tuple[str, ...] = (handle.fingerprint,)
        if kv is not None:
            check_model(handle.model, handle.make_cache(), kv.group_size)
            self.all = kv.fingerprints(handle.fingerprint_with)
        self.primary = self.all[0]

    def of(self, cache: list) -> str:
        """The fingerprint `cache` is stored under: with kv_bits, by whether it is quantized yet."""
        return self.primary if self.kv is None or is_quantized(cache) else self.all[1]

    def new_cache(self) -> list:
        """An empty cache (quantized already when quantized_kv_start is 0, as mlx-lm's first step does)."""
        cache = self.handle.make_cache()
        if self.kv is not None:
            self.kv.apply(cache)
        return cache

    def stored_prefix(self, tokens: list[int]) -> int:
        """Tokens of the longest prefix of `tokens` the store can restore under any of these fingerprints."""
        return max(self.store.match(tokens, model=fp).n_tokens for fp in self.all)

    def richest(self, tokens: list[int]) -> str:
        """The fingerprint under which the store holds the longest prefix of `tokens`."""
        if len(self.all) == 1:
            return self.primary
        return max(self.all, key=lambda fp: self.store.match(tokens, model=fp).n_tokens)

    def load(self, name: str) -> tuple[list, list[int]]:
        """Agent `name`'s stored cache and tokens, under whichever of these fingerprints it belongs to."""
        for fp in self.all[:-1]:
            try:
                return self.store.load(name, model=fp)
            except ModelMismatchError:
                continue
        return self.store.load(name, model=self.all[-1])


__all__ = ["CacheKeys", "KVQuantization"]
