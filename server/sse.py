"""Server-sent events: frames, and a job's events with keep-alives while the model is busy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from .worker import Job

DONE = "data: [DONE]\n\n"


def frame(data: dict, event: str | None = None) -> str:
    """One SSE frame (Anthropic names its events; OpenAI sends data only)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def comment(text: str = "keep-alive") -> str:
    """An SSE comment: clients ignore it, proxies and idle timeouts see traffic."""
    return f": {text}\n\n"


async def job_events(job: Job, keepalive: float) -> AsyncIterator[tuple[str, Any] | None]:
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


async def turn_frames(
    job: Job,
    keepalive: float,
    *,
    ping: str,
    start: Iterable[str] = (),
    delta: Callable[[str], Iterable[str]],
    error: Callable[[BaseException], Iterable[str]],
    end: Callable[[Any], Iterable[str]],  # called with the job's result (a TurnResult)
) -> AsyncIterator[str]:
    """A streamed turn's SSE text, in any API's frames: `start`, then `ping` every `keepalive` seconds
    without an event and delta(text) for each piece, then end(result) or, on failure, error(exception).

    A client that goes away mid-stream closes this generator, which cancels the job (the generation
    stops); after the end the cancel changes nothing.
    """
    try:
        for f in start:
            yield f
        async for event in job_events(job, keepalive):
            if event is None:
                yield ping
                continue
            kind, value = event
            for f in delta(value) if kind == "delta" else error(value) if kind == "error" else end(value):
                yield f
    finally:
        job.cancel()


class HeldBack:
    """The text streamed so far, holding back what may be the start of a tool call (`marker`)."""

    def __init__(self, marker: str | None):
        self.marker, self.text, self.sent = marker, "", 0

    def add(self, piece: str) -> str:
        """Take a generated piece; return the text that can be sent now ("" for none)."""
        self.text += piece
        upto = held_back(self.text, self.marker)
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out


def held_back(text: str, marker: str | None) -> int:
    """How much of `text` can be streamed: all of it, except from a tool-call marker (or its start) on."""
    if not marker:
        return len(text)
    at = text.find(marker)
    if at >= 0:
        return at
    partial = max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)
    return len(text) - partial
