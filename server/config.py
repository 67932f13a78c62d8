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
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in "512M", "20GB", "1.5GiB" or a plain number (K/M/G/T are powers of 1000, KiB... of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use a number with an optional unit: 500M, 20G, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class ServerConfig:
    """The settings of one server process (one model).

    Args:
        model: a model folder, a Hugging Face id, a name `resolve_model` knows, or a loaded
            `(model, tokenizer)` pair / ModelHandle.
        store: the store's folder or database URL (None: $KVSTORE_HOME or ~/.kvstore).
        api_key: required as `Authorization: Bearer KEY` or `x-api-key: KEY`; needed to bind off loopback.
        max_disk: bytes of blobs the store may hold; least recently used conversations go first.
        min_free_disk: below this many free bytes on the store's disk the server stops writing.
        max_resident: conversations whose caches stay in memory; max_resident_bytes bounds their bytes.
        context_length: the longest prompt accepted (None: the model's max_position_embeddings).
        max_body_bytes: larger request bodies are refused with 413.
        keepalive_seconds: a streaming response sends a keep-alive this often while it waits.
        model_id: the name /v1/models lists and requests must use (None: from `model`).
        max_concurrency: turns generated together; more wait in arrival order (server/scheduler.py).
        aliases: more names requests may use for the model (a client that asks for "gpt-4o-mini", say);
            /v1/models lists them after model_id.
    """

    model: Any
    store: str | None = None
    blobs: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_disk: int | None = None
    min_free_disk: int = 1 << 30
    max_resident: int = 4
    max_resident_bytes: int | None = None
    context_length: int | None = None
    max_body_bytes: int = 16 << 20
    keepalive_seconds: float = 5.0
    model_id: str | None = None
    aliases: tuple[str, ...] = ()
    chunk_size: int | None = None
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def check(self) -> None:
        """Refuse settings that would be unsafe or meaningless, with a message that names the fix."""
        if self.host not in LOOPBACK and not self.api_key:
            raise ValueError(
                f"binding {self.host} exposes the model to the network: give --api-key KEY (or bind 127.0.0.1)"
            )
        if self.max_disk is not None and self.max_disk <= 0:
            raise ValueError("--max-disk must be more than 0 bytes")
        for alias in self.aliases:
            if not alias or alias != alias.strip() or not alias.isprintable():
                raise ValueError(f"--alias {alias!r} is not a model name (no blanks around it, no control characters)")
        if self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")
