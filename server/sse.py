"""Server-sent events: frames, and a job's events with keep-alives while the model is busy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from .worker import Job

DONE = "data: [DONE]\n\n"


def frame(data: dict, event: str | None = None) -> str:
    """One SSE frame (Anthropic names its events; OpenAI sends data only)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def comment(text: str = "keep-alive") -> str:
    """An SSE comment: clients ignore it, proxies and idle timeouts see traffic."""
    return f": {text}\n\n"


async def job_events(job: Job, keepalive: float) -> AsyncIterator[tuple[str, object] | None]:
    """The job's events as they come; None every `keepalive` seconds without one (queued or prefilling)."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), keepalive)
        except asyncio.TimeoutError:
            yield None
            continue
        yield event
        if event[0] in ("done", "error"):
            return


def held_back(text: str, marker: str | None) -> int:
    """How much of `text` can be streamed: all of it, except from a tool-call marker (or its start) on."""
    if not marker:
        return len(text)
    at = text.find(marker)
    if at >= 0:
        return at
    partial = max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)
    return len(text) - partial
