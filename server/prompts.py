"""Requests' messages into the chat template's messages and prompt tokens; tool calls out of replies."""

from __future__ import annotations

import uuid
from typing import Any

from kvstore.agents import turn as turn_mod

from .errors import RequestError
from .validate import assistant_tool_calls


def text_of(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (OpenAI and Anthropic shapes alike)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(400, f"{where}: only text content is supported, not {kind!r}", param=where)
        return "".join(out)
    raise RequestError(400, f"{where}: content must be a string or a list of text parts", param=where)


def openai_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as template messages (developer is system; tool-call arguments parsed)."""
    if not messages:
        raise RequestError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(
                400,
                f"messages[{i}].role must be system, user, assistant or tool, not {role!r}",
                param=f"messages[{i}].role",
            )
        msg: dict = {"role": role, "content": text_of(m.get("content"), f"messages[{i}].content")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = assistant_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if m.get(k) is not None:
                    msg[k] = m[k]
        out.append(msg)
    return out


def anthropic_messages(system: Any, messages: list[dict]) -> list[dict]:
    """Anthropic Messages API input as template messages (tool_use -> tool_calls, tool_result -> tool)."""
    if not messages:
        raise RequestError(400, "messages: at least one message is required", param="messages")
    out: list[dict] = []
    if system:
        out.append({"role": "system", "content": text_of(system, "system")})
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise RequestError(400, f"messages.{i}.role: must be user or assistant, not {role!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages.{i}.content: must be a string or a list of content blocks")
        texts, calls, results = [], [], []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(text_of([block], f"messages.{i}.content"))
            elif kind == "tool_use" and role == "assistant":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": block.get("input") or {}},
                    }
                )
            elif kind == "tool_result" and role == "user":
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.get("tool_use_id"),
                        "content": text_of(block.get("content"), f"messages.{i}.content.tool_result"),
                    }
                )
            else:
                raise RequestError(
                    400,
                    f"messages.{i}.content: unsupported content block {kind!r} "
                    "(text, tool_use and tool_result are supported)",
                )
        out.extend(results)
        if texts or calls or not results:
            msg: dict = {"role": role, "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def anthropic_tools(tools: list[dict] | None) -> list[dict] | None:
    """Anthropic tool definitions in the OpenAI (function) shape that chat templates read."""
    if not tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": t.get("name"),
                "description": t.get("description", ""),
                "parameters": t.get("input_schema") or {"type": "object"},
            },
        }
        for t in tools
    ]


def check_length(prompt: list[int], context_length: int | None, max_tokens: int) -> list[int]:
    if not prompt:
        raise RequestError(400, "the prompt is empty", param="messages")
    if context_length is not None and len(prompt) >= context_length:
        raise RequestError(
            400,
            f"the prompt has {len(prompt)} tokens; this model's context is {context_length} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return prompt


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None,
    template_kwargs: dict | None,
    context_length: int | None,
    max_tokens: int,
) -> list[int]:
    """Prompt tokens of a chat request (the model's chat template), checked against the context length."""
    try:
        prompt = turn_mod.render(tokenizer, messages, tools, template_kwargs)
    except RequestError:
        raise
    except Exception as e:  # a template's raise_exception (roles must alternate, ...), jinja errors
        raise RequestError(400, f"the chat template refused these messages: {e}", param="messages") from None
    return check_length(prompt, context_length, max_tokens)


def encode_prompt(tokenizer: Any, prompt: Any, context_length: int | None, max_tokens: int) -> list[int]:
    """Prompt tokens of a completions request: a string, a one-string list, or token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        tokens = [int(t) for t in tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer.get_vocab())
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(400, f"prompt: token ids must be between 0 and {vocab - 1}", param="prompt")
        tokens = list(prompt)
    else:
        raise RequestError(400, "prompt must be a string, a list of one string, or a list of token ids", param="prompt")
    return check_length(tokens, context_length, max_tokens)


def split_tool_calls(tokenizer: Any, text: str, tools: list[dict] | None) -> tuple[str, list[dict]]:
    """(text without tool calls, [{"id", "name", "arguments"}]) where the template defines a tool-call format."""
    start = getattr(tokenizer, "tool_call_start", None)
    end = getattr(tokenizer, "tool_call_end", None)
    parser = getattr(tokenizer, "tool_parser", None)
    if not tools or not start or parser is None or start not in text:
        return text, []
    kept, calls, rest = [], [], text
    while start in rest:
        before, _, after = rest.partition(start)
        kept.append(before)
        body, found, rest = after.partition(end) if end else (after, "", "")
        try:
            parsed = parser(body, tools)
        except (ValueError, KeyError, TypeError):  # a call cut short by max_tokens, or malformed
            kept.append(start + body + found)
            continue
        for call in parsed if isinstance(parsed, list) else [parsed]:
            calls.append(
                {
                    "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    "name": call.get("name"),
                    "arguments": call.get("arguments") or {},
                }
            )
    kept.append(rest)
    return "".join(kept).strip() if calls else text, calls


def tool_call_start(tokenizer: Any, tools: list[dict] | None) -> str | None:
    """The marker after which a streamed reply is held back to be parsed as tool calls."""
    if not tools or getattr(tokenizer, "tool_parser", None) is None:
        return None
    return getattr(tokenizer, "tool_call_start", None)
