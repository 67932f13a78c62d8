"""Decode steps of many conversations in one forward pass: mlx-lm's BatchKVCache, a row per conversation.

A conversation joins with its own prefilled cache (copied into the batch, left-padded to the
longest) and the prompt's last token; every `step()` feeds each row its pending token and samples
the next with the row's own sampler, logits processors and random key; `leave()` hands back the
row's cache as a plain KVCache holding exactly the tokens that row was fed. Only models whose
every layer is a plain `KVCache` are batched (`batchable`): other cache kinds run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from kvstore.agents import GenerationOptions

__all__ = ["DecodeBatch", "Row", "batchable"]


def batchable(cache: list) -> bool:
    """Whether a fresh cache of this model can decode in a batch (every layer a plain KVCache)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


def keyed_sample(options: GenerationOptions, logprobs: mx.array, key: mx.array) -> mx.array:
    """make_sampler(options)'s draw with an explicit key: its filters in its order, then the categorical.

    MLX's global generator splits its key the same way for every draw, so a row that splits its own
    key per token draws what a turn seeded alone draws (tests/test_batch.py checks it).
    """
    if 0 < options.top_p < 1.0:
        logprobs = apply_top_p(logprobs, options.top_p)
    if options.min_p != 0.0:
        logprobs = apply_min_p(logprobs, options.min_p, 1)
    if options.top_k > 0:
        logprobs = apply_top_k(logprobs, options.top_k)
    return mx.random.categorical(logprobs * (1.0 / options.temp), key=key)


@dataclass
class Row:
    """One conversation's place in the batch: how it samples and what it has been fed."""

    options: GenerationOptions
    sampler: Callable
    processors: list
    greedy: bool
    key: mx.array | None  # its own random key when the request gave a seed
    pending: int  # the token the next step feeds
    context: list[int] = field(default_factory=list)  # what the logits processors see (as generate_step's)

    @classmethod
    def for_options(cls, options: GenerationOptions, last: int) -> Row:
        """A row that samples as `turn.sampling(options)` does for a turn run alone."""
        sampler = make_sampler(options.temp, top_p=options.top_p, min_p=options.min_p, top_k=options.top_k)
        processors = make_logits_processors(repetition_penalty=options.repetition_penalty)
        key = mx.random.key(options.seed) if options.seed is not None and options.temp > 0 else None
        return cls(options, sampler, processors, options.temp == 0, key, last, [last] if processors else [])


class DecodeBatch:
    """The rows decoding together and their batched KV cache (one BatchKVCache per layer)."""

    def __init__(self, model: Any):
        self.model = model
        self.rows: list[Row] = []
        self.cache: list[BatchKVCache] = []

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def join(self, row: Row, cache: list) -> None:
        """Add a conversation whose `cache` holds its prompt but the last token (`row.pending`)."""
        merged = [BatchKVCache.merge([c]) for c in cache]
        if not self.rows:
            self.cache = merged
        else:
            for mine, new in zip(self.cache, merged):
                mine.extend(new)
        self.rows.append(row)

    def leave(self, index: int) -> list:
        """Take row `index` out; its cache as plain KVCaches (exactly the tokens the row was fed)."""
        out = [c.extract(index) for c in self.cache]
        mx.eval([(c.keys, c.values) for c in out])
        keep = [i for i in range(len(self.rows)) if i != index]
        del self.rows[index]
        if keep:
            for c in self.cache:
                c.filter(keep)
        else:
            self.cache = []
        return out

    def step(self) -> list[int]:
        """Feed every row its pending token; returns each row's next token (also its new `pending`)."""
        inputs = mx.array([[r.pending] for r in self.rows])
        logits = self.model(inputs, cache=self.cache)[:, -1, :]
        rows = []
        for i, r in enumerate(self.rows):
            row = logits[i : i + 1]
            for proc in r.processors:
                row = proc(mx.array(r.context), row)
            rows.append(row)
        if any(r.processors for r in self.rows):
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picks: list[mx.array | None] = [None] * len(self.rows)
        greedy = [i for i, r in enumerate(self.rows) if r.greedy]
        if greedy:
            best = mx.argmax(logprobs, axis=-1)
            for i in greedy:
                picks[i] = best[i : i + 1]
        for i, r in enumerate(self.rows):
            if r.greedy:
                continue
            if r.key is None:
                picks[i] = r.sampler(logprobs[i : i + 1])
                continue
            r.key, draw = mx.random.split(r.key)  # a seeded row draws from its own key, as when alone
            picks[i] = keyed_sample(r.options, logprobs[i : i + 1], draw)
        tokens = [int(t) for t in mx.concatenate([p.reshape(-1) for p in picks]).tolist()]  # type: ignore[union-attr,arg-type]  # a 1-D array's tolist() is a list
        for r, t in zip(self.rows, tokens):
            r.pending = t
            if r.processors:
                r.context.append(t)
        return tokens
