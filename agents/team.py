"""One query to several agents, then a coordinator that reads their answers (the demo's pattern)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .agent import Agent
from .records import Reply

BRIEF = "{query}\n\nYour team has answered.\n\n{answers}\n\nCombine their answers into one recommendation for the team."


@dataclass(frozen=True)
class Consultation:
    """The specialists' replies (by agent name, in the order asked) and the coordinator's."""

    query: str
    replies: dict[str, Reply] = field(default_factory=dict)
    summary: Reply | None = None

    def all(self) -> list[Reply]:
        """Every reply in the order they were produced, the coordinator's last."""
        return list(self.replies.values()) + ([self.summary] if self.summary is not None else [])


def coordinator_message(query: str, replies: dict[str, Reply]) -> str:
    """The message a coordinator gets: the query and each specialist's answer under its name."""
    answers = "\n\n".join(f"### {name}\n{reply.text.strip()}" for name, reply in replies.items())
    return BRIEF.format(query=query, answers=answers)


def consult(
    specialists: Sequence[Agent],
    coordinator: Agent | None,
    query: str,
    *,
    on_reply: Callable[[Reply], None] | None = None,
    **chat_options,
) -> Consultation:
    """Ask every specialist `query` in turn, then give the coordinator their answers.

    Args:
        specialists: the agents that answer the query.
        coordinator: the agent that combines their answers (None: no summary).
        query: the user's question.
        on_reply: called with each Reply as soon as it is ready (progress for long runs).
        chat_options: passed to every `Agent.chat` (max_tokens, temp, ...).
    """
    replies: dict[str, Reply] = {}
    for agent in specialists:
        reply = agent.chat(query, **chat_options)
        replies[agent.name] = reply
        if on_reply is not None:
            on_reply(reply)
    summary = None
    if coordinator is not None:
        summary = coordinator.chat(coordinator_message(query, replies), **chat_options)
        if on_reply is not None:
            on_reply(summary)
    return Consultation(query=query, replies=replies, summary=summary)
