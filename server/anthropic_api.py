"""The Anthropic Messages API's request schema, response body and stream events."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvstore.agents import GenerationOptions

from .conversations import TurnResult
from .validate import MAX_STOP_SEQUENCES, stop_strings


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int = Field(..., ge=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)  # an extension (Anthropic's API has none): repeatable sampling

    def options(self, tools: list[dict] | None) -> GenerationOptions:
        return GenerationOptions(
            max_tokens=self.max_tokens,
            temp=self.temperature or 0.0,
            top_p=self.top_p or 0.0,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop_strings(
                [s for s in self.stop_sequences or () if s], param="stop_sequences", max_count=MAX_STOP_SEQUENCES
            ),
            tools=tools,
        )

    @property
    def template_tools(self) -> bool:
        return bool(self.tools) and (self.tool_choice or {}).get("type") != "none"


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def usage(r: TurnResult) -> dict:
    """Anthropic usage, counted as Anthropic's API does: input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens is the prompt. Cache creation is what this request wrote of the prefix
    its cache_control breakpoints mark (none without breakpoints: kvstore then caches on its own, and
    those tokens count as input); cache reads are every token that came from a cache."""
    created, five_minutes, one_hour = r.cache_creation
    return {
        "input_tokens": r.prompt_tokens - r.cached - created,
        "output_tokens": r.reply.stats.generated_tokens,
        "cache_read_input_tokens": r.cached,
        "cache_creation_input_tokens": created,
        "cache_creation": {"ephemeral_5m_input_tokens": five_minutes, "ephemeral_1h_input_tokens": one_hour},
        "kvstore": r.usage_detail(),
    }


def stop_reason(r: TurnResult, calls: list) -> tuple[str, str | None]:
    if calls:
        return "tool_use", None
    if r.reply.finish_reason == "length":
        return "max_tokens", None
    stopped_by = r.stopped_by
    return ("stop_sequence", stopped_by) if stopped_by else ("end_turn", None)


def tool_use_blocks(calls: list[dict]) -> list[dict]:
    return [
        {"type": "tool_use", "id": c["id"].replace("call_", "toolu_", 1), "name": c["name"], "input": c["arguments"]}
        for c in calls
    ]


def content_blocks(text: str, calls: list[dict]) -> list[dict]:
    """The reply's blocks: its text (also when empty, unless there are tool calls), then its tool calls."""
    return ([{"type": "text", "text": text}] if text or not calls else []) + tool_use_blocks(calls)


def message_body(mid: str, model: str, r: TurnResult, text: str, calls: list[dict]) -> dict:
    reason, seq = stop_reason(r, calls)
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(text, calls),
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": usage(r),
    }


def message_start(mid: str, model: str, prompt_tokens: int) -> dict:
    return {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        },
    }
