"""What clients say to keep: Anthropic `cache_control` pins, OpenAI `prompt_cache_key` / `user` namespaces.

A server conversation's own record (the agent meta under `MARK`) holds what retention needs:
whether it is anonymous, its namespace, and its pins. A pin is the prefix up to a `cache_control`
breakpoint, kept for the breakpoint's ttl from the last request that carried it (5 minutes unless it
says "1h", as Anthropic's API does); the budget never drops the conversation that holds a pinned
prefix before its ttl runs out.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import xxhash

from kvstore.agents import turn as turn_mod
from kvstore.records import AgentRecord

from .errors import RequestError
from .prompts import anthropic_messages, anthropic_tools
from .validate import ANONYMOUS

MARK = "kvstore_serve"  # the agent meta key that marks a server conversation
NAMESPACED = "key:"  # the name prefix of conversations of a prompt_cache_key / user namespace
TTLS = {"5m": 300, "1h": 3600}  # Anthropic's cache_control ttls
DEFAULT_TTL = "5m"
MAX_BREAKPOINTS = 4  # Anthropic allows up to four cache_control blocks per request


@dataclass(frozen=True)
class Pin:
    """A prefix of the prompt a client asked to keep: its length in tokens and its ttl."""

    tokens: int
    ttl: str  # "5m" | "1h"

    @property
    def seconds(self) -> int:
        return TTLS[self.ttl]


def conversation_mark(record: dict | None) -> dict | None:
    """The server's part of a stored agent record, or None for an agent the server did not create."""
    mark = AgentRecord.parse(record).meta.get(MARK)
    return mark if isinstance(mark, dict) else None


def is_anonymous(record: dict | None) -> bool:
    return bool((conversation_mark(record) or {}).get("anonymous"))


def namespace_of(record: dict | None) -> str | None:
    ns = (conversation_mark(record) or {}).get("namespace")
    return ns if isinstance(ns, str) else None


def pinned_until(record: dict | None) -> float:
    """The epoch second the last of a conversation's pins runs out (0 when it has none)."""
    pins = (conversation_mark(record) or {}).get("pins") or []
    return max((float(p.get("until", 0)) for p in pins if isinstance(p, dict)), default=0.0)


def merge_pins(mark: dict, pins: list[Pin], now: float | None = None) -> None:
    """Record this request's pins in a conversation's mark (refreshing their ttl); expired ones go."""
    now = time.time() if now is None else now
    kept = [p for p in mark.get("pins") or [] if float(p.get("until", 0)) > now]
    for pin in pins:
        kept = [p for p in kept if not (p["tokens"] == pin.tokens and p["ttl"] == pin.ttl)]
        kept.append({"tokens": pin.tokens, "ttl": pin.ttl, "until": now + pin.seconds})
    mark["pins"] = kept


def new_name(namespace: str | None) -> str:
    """A fresh conversation name: anon:<hex>, or key:<readable part of the namespace>:<hex>."""
    if namespace is None:
        return ANONYMOUS + uuid.uuid4().hex[:16]
    readable = re.sub(r"[^A-Za-z0-9_.@+-]", "_", namespace)[:40].lstrip(".-") or "ns"
    return f"{NAMESPACED}{readable}:{xxhash.xxh64_hexdigest(namespace.encode())[:8]}:{uuid.uuid4().hex[:12]}"


def namespace(body_extra: dict | None) -> str | None:
    """An OpenAI request's namespace: its prompt_cache_key, else its user (None when it has neither)."""
    for key in ("prompt_cache_key", "user"):
        value = (body_extra or {}).get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > 256:
            raise RequestError(400, f"{key} must be a string of 1 to 256 characters", param=key)
        return value
    return None


def _ttl(block: dict, where: str) -> str | None:
    cc = block.get("cache_control") if isinstance(block, dict) else None
    if cc is None:
        return None
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise RequestError(400, f'{where}.cache_control: only {{"type": "ephemeral"}} is supported', param=where)
    ttl = cc.get("ttl", DEFAULT_TTL)
    if ttl not in TTLS:
        raise RequestError(400, f'{where}.cache_control.ttl: must be "5m" or "1h", not {ttl!r}', param=where)
    return ttl


def breakpoints(system: Any, messages: list[dict], tools: list[dict] | None) -> list[tuple[str, int, int, str]]:
    """Anthropic cache_control breakpoints: (where: tools | system | message, index, block index, ttl)."""
    found = []
    for i, tool in enumerate(tools or []):
        if (ttl := _ttl(tool, f"tools.{i}")) is not None:
            found.append(("tools", i, 0, ttl))
    for j, block in enumerate(system if isinstance(system, list) else []):
        if (ttl := _ttl(block, f"system.{j}")) is not None:
            found.append(("system", 0, j, ttl))
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if (ttl := _ttl(block, f"messages.{i}.content.{j}")) is not None:
                found.append(("message", i, j, ttl))
    if len(found) > MAX_BREAKPOINTS:
        raise RequestError(400, f"a request may have at most {MAX_BREAKPOINTS} blocks with cache_control")
    return found


def anthropic_pins(
    tokenizer: Any, prompt: list[int], system: Any, messages: list[dict], tools: list[dict] | None
) -> list[Pin]:
    """The prompt prefixes a request's cache_control breakpoints mark, as Pins.

    A breakpoint's prefix ends where the prompt stops agreeing with the rendering of everything up to
    and including the marked block (Anthropic's order: tools, then system, then messages).
    """
    pins = []
    for where, i, j, ttl in breakpoints(system, messages, tools):
        if where == "tools":
            head = anthropic_messages(system, [{"role": "user", "content": ""}])[:-1]
            msgs, tpl_tools = head, anthropic_tools(tools[: i + 1])
        elif where == "system":
            msgs = anthropic_messages(system[: j + 1], [{"role": "user", "content": ""}])[:1]
            tpl_tools = anthropic_tools(tools)
        else:
            cut = dict(messages[i], content=messages[i]["content"][: j + 1])
            msgs, tpl_tools = anthropic_messages(system, [*messages[:i], cut]), anthropic_tools(tools)
        try:
            partial = turn_mod.render(tokenizer, msgs, tpl_tools)
        except Exception:  # noqa: BLE001 - a template that refuses a partial conversation: no pin for it
            continue
        n = turn_mod.common_prefix(prompt, partial)
        if n > 0:
            pins.append(Pin(n, ttl))
    return pins


def cache_creation(pins: list[Pin], cached: int) -> tuple[int, int, int]:
    """(cache_creation_input_tokens, of them for 5m, for 1h): the pinned tokens this request wrote.

    Anthropic counts as cache creation the prompt tokens up to the last breakpoint that were not read
    from the cache; the 1h part is what lies below the longest 1h breakpoint.
    """
    longest = max((p.tokens for p in pins), default=0)
    longest_1h = max((p.tokens for p in pins if p.ttl == "1h"), default=0)
    total = max(0, longest - cached)
    one_hour = max(0, longest_1h - cached)
    return total, total - one_hour, one_hour
