"""The reliability suite's scenario: its model fingerprints, chunk size and shared prompts, on caches whose KV
is a function of the token prefix (`kvstore.testing.prefix_cache`), so any restore can be checked with
`expected_sum(tokens)` without keeping the original cache around."""

from __future__ import annotations

import random

from kvstore import testing
from kvstore.testing import checksum  # noqa: F401  (the suite compares caches as synth.checksum)

FP = "5e" * 16  # model fingerprint of the synthetic model
OTHER_FP = "a7" * 16  # another model, for mismatch tests
CHUNK = 16  # store chunk size: short token lists still span several chunks
HEADS, DIM = 2, 32
WINDOW = 24  # sliding-window size of the rotating layer
KINDS = ("kv", "kv", "rot", "quant")
PREFIXES = [[random.Random(1000 + i).randrange(5000) for _ in range(n)] for i, n in enumerate((40, 23, 50))]


def make_cache(tokens: list[int], kinds=KINDS) -> list:
    """A cache that has seen exactly `tokens` in one prefill."""
    return testing.prefix_cache(tokens, kinds, HEADS, DIM, WINDOW)


def extend(cache: list, old: list[int], new: list[int], rng: random.Random) -> list:
    """Feed the positions of `new` past `old` into `cache` (in place) in decode steps and prefill bursts."""
    return testing.extend_prefix(cache, old, new, rng, HEADS, DIM)


def expected_sum(tokens: list[int], kinds=KINDS) -> str:
    """The checksum any correct restore of `tokens` must have."""
    return testing.expected_sum(tokens, kinds, HEADS, DIM, WINDOW)


def agent_tokens(rng: random.Random, max_suffix: int = 40) -> list[int]:
    """A shared system prompt (cut at a random length) and a random user part."""
    prefix = rng.choice(PREFIXES)
    return prefix[: rng.randint(len(prefix) // 2, len(prefix))] + [
        rng.randrange(5000) for _ in range(rng.randint(0, max_suffix))
    ]
