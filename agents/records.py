"""What the agent manager hands back: replies, turn statistics, memory reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerationOptions:
    """How one turn renders its prompt and samples its reply (mlx-lm's sampler and logits processors).

    `temp` 0 is greedy; `top_p` 0 or 1, `top_k` 0 and `min_p` 0 leave sampling unfiltered; a
    `repetition_penalty` applies over the last 20 tokens. `stop` strings end the reply (the text
    stops before the first one). `tools` and `chat_template_kwargs` go to the chat template.
    """

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tools: list[dict] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a whole number >= 1, not {self.max_tokens!r}")
        if not self.temp >= 0:
            raise ValueError(f"temp must be >= 0, not {self.temp!r}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, not {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, not {self.min_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, not {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be non-empty strings")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1 (MLX's seed), not {self.seed!r}")


@dataclass(frozen=True)
class TurnStats:
    """Where one turn's prompt tokens came from, and how long it took.

    `prompt_tokens == reused_tokens + restored_tokens + prefilled_tokens`.
    """

    prompt_tokens: int  # the rendered prompt (chat template over the whole conversation)
    reused_tokens: int  # taken from the agent's resident cache
    restored_tokens: int  # restored from the store (its own snapshot or any stored prefix)
    prefilled_tokens: int  # computed by the model this turn
    generated_tokens: int
    ttft: float  # seconds from the call to the first generated token
    tokens_per_second: float  # generation speed after the first token
    restore_seconds: float = 0.0
    prefill_seconds: float = 0.0
    save_seconds: float = 0.0
    bytes_saved: int = 0  # blob bytes the autosave wrote (only chunks the store lacked)
    source: str = "cold"  # "resident" | "store" | "cold": where the reused part came from
    recovered: bool = False  # a damaged or missing blob was recomputed this turn

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    """An agent's answer: its text, the generated token ids and the turn's statistics."""

    text: str
    tokens: tuple[int, ...]
    stats: TurnStats
    finish_reason: str  # "stop" (end of turn token or a stop string) | "length" (max_tokens) | "interrupted"
    agent: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class MemoryReport:
    """Memory in use: the model, each resident cache, and the whole process."""

    model_bytes: int  # parameters of the loaded model
    caches: dict[str, int] = field(default_factory=dict)  # resident agent -> cache bytes (KV + capture)
    cache_tokens: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0  # the process's resident set now
    peak_rss_bytes: int = 0  # its high-water mark
    mlx_active_bytes: int = 0  # MLX's allocator (0 where it does not report)
    mlx_peak_bytes: int = 0

    @property
    def caches_bytes(self) -> int:
        return sum(self.caches.values())

    def as_dict(self) -> dict:
        return dict(asdict(self), caches_bytes=self.caches_bytes)
