"""The server's Prometheus metrics: what /metrics serves, and the small functions that move them.

One server process serves one model, so the metrics live in one module-level registry (not the
prometheus_client global one: importing kvstore must not add series to an embedding program's
/metrics). The request middleware (request_log.py) counts requests and turns; the model thread
counts evictions and, through `count_miss`, the reasons prompt tokens were not cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .conversations import TurnResult

__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "ROUTES",
    "count_evictions",
    "count_miss",
    "count_request",
    "observe_turn",
    "render",
    "set_queue_depth",
    "set_store_bytes",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry(auto_describe=True)

# A request's `route` label is its path when the server has that route, else "other": a client that
# probes random paths must not grow the number of series without bound.
ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/messages",
        "/v1/models",
        "/health",
        "/metrics",
        "/v1/cache/stats",
        "/v1/cache/lookup",
        "/v1/cache",
    }
)

REQUESTS = Counter(
    "kvstore_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=REGISTRY
)
PROMPT_TOKENS = Counter("kvstore_prompt_tokens", "Prompt tokens of the turns served", registry=REGISTRY)
CACHED_TOKENS = Counter(
    "kvstore_cached_tokens",
    "Prompt tokens taken from a cache instead of prefilled, by source (ram: a cache in memory, disk: the store)",
    ["source"],
    registry=REGISTRY,
)
PREFILLED_TOKENS = Counter("kvstore_prefilled_tokens", "Prompt tokens run through the model", registry=REGISTRY)
GENERATED_TOKENS = Counter("kvstore_generated_tokens", "Tokens generated", registry=REGISTRY)
HITS = Counter(
    "kvstore_cache_hits",
    "Turns whose prompt started from a cache, by the cache's source (ram or disk)",
    ["source"],
    registry=REGISTRY,
)
MISSES = Counter(
    "kvstore_cache_misses",
    "Turns with prompt tokens no cache had, by the reason the first of them was not cached",
    ["reason"],
    registry=REGISTRY,
)
MISSED_TOKENS = Counter(
    "kvstore_cache_missed_tokens", "Prompt tokens no cache had, by reason", ["reason"], registry=REGISTRY
)
EVICTIONS = Counter(
    "kvstore_evictions",
    "Conversations dropped from the store, by why (budget: --max-disk)",
    ["cause"],
    registry=REGISTRY,
)
# Buckets from ~10 ms (a cached turn of a small model) to a few minutes (a cold prefill of a long prompt on a CPU).
TTFT = Histogram(
    "kvstore_ttft_seconds",
    "Seconds from a request's arrival to its first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Histogram(
    "kvstore_generation_tokens_per_second",
    "Generation speed of each turn (tokens after the first, per second)",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
    registry=REGISTRY,
)
STORE_BYTES = Gauge(
    "kvstore_store_bytes", "Bytes of blobs the store holds (as of the last scrape that could ask)", registry=REGISTRY
)
QUEUE_DEPTH = Gauge("kvstore_queue_depth", "Requests waiting for or running on the model thread", registry=REGISTRY)


def count_request(route: str, status: int) -> None:
    """One answered request (any status, 4xx and 5xx included)."""
    REQUESTS.labels(route if route in ROUTES else "other", str(status)).inc()


def observe_turn(result: TurnResult) -> None:
    """A finished turn's tokens, TTFT and speed."""
    PROMPT_TOKENS.inc(result.prompt_tokens)
    CACHED_TOKENS.labels("ram").inc(result.cached_ram)
    CACHED_TOKENS.labels("disk").inc(result.cached_disk)
    PREFILLED_TOKENS.inc(result.prefilled)
    stats = result.reply.stats
    GENERATED_TOKENS.inc(stats.generated_tokens)
    if result.cached_ram:
        HITS.labels("ram").inc()
    if result.cached_disk:
        HITS.labels("disk").inc()
    if stats.generated_tokens:
        TTFT.observe(result.ttft)
    if stats.generated_tokens > 1 and stats.tokens_per_second > 0:
        TOKENS_PER_SECOND.observe(stats.tokens_per_second)


def count_miss(reason: str, tokens: int) -> None:
    """A turn that had to prefill `tokens` prompt tokens no cache held, and why (a short reason code).

    Called by whatever explains the miss (the first differing position against the longest stored
    prefix); the reason codes are that code's, e.g. new_content, evicted, other_model.
    """
    MISSES.labels(reason).inc()
    MISSED_TOKENS.labels(reason).inc(max(0, tokens))


def count_evictions(n: int, cause: str = "budget") -> None:
    """`n` conversations dropped from the store."""
    if n:
        EVICTIONS.labels(cause).inc(n)


def set_store_bytes(n: int) -> None:
    STORE_BYTES.set(n)


def set_queue_depth(n: int) -> None:
    """Requests waiting for or running on the model thread (read at each scrape)."""
    QUEUE_DEPTH.set(n)


def render() -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(REGISTRY)
