"""Checks of request fields that the schemas cannot express, each a 400 that names the field (issue 25)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from kvstore.errors import InvalidNameError
from kvstore.names import validate_name

from .errors import RequestError

ANONYMOUS = "anon:"  # the reserved name prefix of conversations no header or key named

# Stop strings: OpenAI's API takes up to 4; Anthropic documents no limit, so this server sets one. Matching
# costs time linear in the reply (agents/stops.py); the limits bound the per-character work and the memory.
OPENAI_MAX_STOPS = 4
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1000


def stop_strings(stops: list[str], *, param: str, max_count: int) -> tuple[str, ...]:
    """The stop strings, refused when there are too many, one is empty, or one is too long."""
    if len(stops) > max_count:
        raise RequestError(400, f"{param}: at most {max_count} stop strings, not {len(stops)}", param=param)
    for i, s in enumerate(stops):
        if not s:
            raise RequestError(400, f"{param}[{i}]: a stop string must not be empty", param=param)
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(
                400, f"{param}[{i}]: a stop string is at most {MAX_STOP_CHARS} characters, not {len(s)}", param=param
            )
    return tuple(stops)


def _arguments(value: Any) -> Any:
    """Tool-call arguments as the templates expect them: a mapping, not a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def assistant_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's OpenAI tool calls, checked, with their arguments parsed for the template."""
    if not isinstance(calls, list):
        raise RequestError(400, f"{where} must be a list of tool calls", param=where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(
                400, f'{at} must be an object with a "function": {{"name": "...", "arguments": "..."}}', param=at
            )
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise RequestError(400, f"{at}.function.arguments must be a JSON string or an object", param=at)
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise RequestError(400, f"{at}.id must be a string", param=at)
        out.append(dict(call, function=dict(fn, arguments=_arguments(args))))
    return out


def conversation_header(request: Request) -> str | None:
    """The conversation the `X-Kvstore-Agent` header names: a valid name outside the reserved `anon:` space."""
    value = request.headers.get("x-kvstore-agent")
    if value is None:
        return None
    try:
        validate_name(value, "X-Kvstore-Agent")
    except InvalidNameError as e:
        raise RequestError(400, str(e), param="X-Kvstore-Agent") from None
    if value.startswith(ANONYMOUS):
        raise RequestError(
            400,
            f"X-Kvstore-Agent: names starting with {ANONYMOUS!r} are reserved for the conversations no "
            "header named (the server continues those by their prompt); choose another name",
            param="X-Kvstore-Agent",
        )
    return value
