"""The OpenAI API's request schemas and response bodies (chat completions, completions)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvstore.agents import GenerationOptions

from .conversations import TurnResult
from .errors import RequestError
from .validate import OPENAI_MAX_STOPS, stop_strings

DEFAULT_MAX_TOKENS = 512


class _Sampling(BaseModel):
    # Unknown fields are accepted and ignored (clients send many); known ones must have the right type.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)  # MLX seeds with an unsigned 64-bit integer
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def options(
        self, max_tokens: int | None, tools: list[dict] | None = None, template_kwargs: dict | None = None
    ) -> GenerationOptions:
        if self.n != 1:
            raise RequestError(400, "n must be 1: this server generates one choice per request", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationOptions(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temp=self.temperature or 0.0,
            top_p=self.top_p or 0.0,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop_strings(stop, param="stop", max_count=OPENAI_MAX_STOPS),
            tools=tools,
            chat_template_kwargs=template_kwargs,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def template_tools(self) -> list[dict] | None:
        return None if self.tool_choice == "none" else self.tools or None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


def usage(r: TurnResult) -> dict:
    """OpenAI usage, with kvstore's own account of where the cached tokens came from."""
    n_gen = r.reply.stats.generated_tokens
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": n_gen,
        "total_tokens": r.prompt_tokens + n_gen,
        "prompt_tokens_details": {"cached_tokens": r.cached},
        "kvstore": r.usage_detail(),
    }


def finish_reason(r: TurnResult, calls: list) -> str:
    if calls:
        return "tool_calls"
    return "length" if r.reply.finish_reason == "length" else "stop"


def tool_calls(calls: list[dict], streaming: bool = False) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        tc = {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        out.append(dict(tc, index=i) if streaming else tc)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_body(rid: str, model: str, r: TurnResult, text: str, calls: list[dict]) -> dict:
    message: dict = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = tool_calls(calls)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(r, calls)}],
        "usage": usage(r),
    }


def chat_chunk(
    rid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None, choices: bool = True
) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_body(rid: str, model: str, r: TurnResult) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": r.reply.text, "logprobs": None, "finish_reason": finish_reason(r, [])}],
        "usage": usage(r),
    }


def completion_chunk(
    rid: str, model: str, text: str, finish: str | None = None, usage_: dict | None = None, choices: bool = True
) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}] if choices else [],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
