"""What the agent manager hands back: replies, turn statistics, memory reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TurnStats:
    """Where one turn's prompt tokens came from, and how long it took.

    `prompt_tokens == reused_tokens + restored_tokens + prefilled_tokens`.
    """

    prompt_tokens: int          # the rendered prompt (chat template over the whole conversation)
    reused_tokens: int          # taken from the agent's resident cache
    restored_tokens: int        # restored from the store (its own snapshot or any stored prefix)
    prefilled_tokens: int       # computed by the model this turn
    generated_tokens: int
    ttft: float                 # seconds from the call to the first generated token
    tokens_per_second: float    # generation speed after the first token
    restore_seconds: float = 0.0
    prefill_seconds: float = 0.0
    save_seconds: float = 0.0
    bytes_saved: int = 0        # blob bytes the autosave wrote (only chunks the store lacked)
    source: str = "cold"        # "resident" | "store" | "cold": where the reused part came from
    recovered: bool = False     # a damaged or missing blob was recomputed this turn

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    """An agent's answer: its text, the generated token ids and the turn's statistics."""

    text: str
    tokens: tuple[int, ...]
    stats: TurnStats
    finish_reason: str          # "stop" (end of turn token) | "length" (max_tokens) | "interrupted"
    agent: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class MemoryReport:
    """Memory in use: the model, each resident cache, and the whole process."""

    model_bytes: int                        # parameters of the loaded model
    caches: dict[str, int] = field(default_factory=dict)   # resident agent -> cache bytes (KV + capture)
    cache_tokens: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0                      # the process's resident set now
    peak_rss_bytes: int = 0                 # its high-water mark
    mlx_active_bytes: int = 0               # MLX's allocator (0 where it does not report)
    mlx_peak_bytes: int = 0

    @property
    def caches_bytes(self) -> int:
        return sum(self.caches.values())

    def as_dict(self) -> dict:
        return dict(asdict(self), caches_bytes=self.caches_bytes)
