"""What a `kvstore serve` process runs: the model, the store, the address and the budgets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Turns decoded together by default. Measured here (CPU, OpenBLAS, SmolLM2-135M): a decode step of 8
# rows costs 1.8x the CPU time of a 1-row step (317 vs 175 ms), 4.4x the tokens per CPU second; 8 is
# also mlx_lm.server's --prompt-concurrency default. docs/BENCHMARKS.md has the concurrent workload.
DEFAULT_MAX_CONCURRENCY = 8


def parse_duration(text: str | float) -> float:
    """Seconds in "90s", "30m", "24h", "7d" or a plain number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use a number with an optional unit: 90s, 30m, 24h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@dataclass
class ServerConfig:
    """The settings of one server process (one model).

    Args:
        model: a model folder, a Hugging Face id, a name `resolve_model` knows, or a loaded
            `(model, tokenizer)` pair / ModelHandle.
        store: the store's folder or database URL (None: $KVSTORE_HOME or ~/.kvstore).
        api_key: required as `Authorization: Bearer KEY` or `x-api-key: KEY`; needed to bind off loopback.
        max_disk: bytes the store (blobs and index) may hold; "auto": min(30 GiB, a quarter of the
            free disk at start); None: no bound. Anonymous conversations go first, then named ones,
            least recently used first; pinned ones and agents the server did not create never.
        min_free_disk: below this many free bytes on the store's disk the server stops writing.
        anon_ttl: seconds an anonymous conversation is kept after its last turn (None: no expiry).
        namespace_quota: bytes each prompt_cache_key / user namespace's conversations may hold.
        max_writes_per_day: blob bytes the server may write per UTC day; past it caches stay in memory.
        max_resident: conversations whose caches stay in memory; max_resident_bytes bounds their bytes.
        context_length: the longest prompt accepted (None: the model's max_position_embeddings).
        max_body_bytes: larger request bodies are refused with 413.
        keepalive_seconds: a streaming response sends a keep-alive this often while it waits.
        model_id: the name /v1/models lists and requests must use (None: from `model`).
        max_concurrency: turns generated together; more wait in arrival order (server/scheduler.py).
        aliases: more names requests may use for the model (a client that asks for "gpt-4o-mini", say);
            /v1/models lists them after model_id.
        progress_seconds: a long prefill logs its progress (tokens done, tokens/s, ETA) at most this often.
        kv_bits, kv_group_size, quantized_kv_start: KV-cache quantization, as mlx-lm's server takes them.
    """

    model: Any
    store: str | None = None
    blobs: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_disk: int | str | None = "auto"
    min_free_disk: int = 1 << 30
    anon_ttl: float | None = 24 * 3600.0
    namespace_quota: int | None = None
    max_writes_per_day: int | None = None
    max_resident: int = 4
    max_resident_bytes: int | None = None
    context_length: int | None = None
    max_body_bytes: int = 16 << 20
    keepalive_seconds: float = 5.0
    model_id: str | None = None
    aliases: tuple[str, ...] = ()
    chunk_size: int | None = None
    progress_seconds: float = 5.0
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000  # mlx-lm's DEFAULT_QUANTIZED_KV_START (not imported: this module loads without MLX)
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def check(self) -> None:
        """Refuse settings that would be unsafe or meaningless, with a message that names the fix."""
        if self.host not in LOOPBACK and not self.api_key:
            raise ValueError(
                f"binding {self.host} exposes the model to the network: give --api-key KEY (or bind 127.0.0.1)"
            )
        if isinstance(self.max_disk, int) and self.max_disk <= 0:
            raise ValueError("--max-disk must be more than 0 bytes (none turns the budget off)")
        for what, value in (
            ("--anon-ttl", self.anon_ttl),
            ("--namespace-quota", self.namespace_quota),
            ("--max-writes-per-day", self.max_writes_per_day),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{what} must be more than 0 (none turns it off)")
        for alias in self.aliases:
            if not alias or alias != alias.strip() or not alias.isprintable():
                raise ValueError(f"--alias {alias!r} is not a model name (no blanks around it, no control characters)")
        if self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")
