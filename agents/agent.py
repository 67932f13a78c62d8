"""An agent: a name, a role (system prompt), its messages and the exact tokens its KV cache has seen."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from kvstore.records import AGENT_RECORD_KEY, AgentRecord

from . import turn
from .records import GenerationOptions, Reply, TurnStats

if TYPE_CHECKING:
    from .manager import AgentManager
    from .turn import TurnState

RECORD_VERSION = 1
KEEP_TURN_STATS = 64  # the record keeps the last few turns' statistics (the demo compares sessions)


class ReplyStream:
    """Text segments of a reply as they are generated; `.reply` holds the Reply once it is exhausted."""

    def __init__(self, segments: Generator[str, None, None], state: TurnState):
        self._segments = segments
        self.state = state

    def __iter__(self) -> Iterator[str]:
        return self._segments

    def __next__(self) -> str:
        return next(self._segments)

    def close(self) -> None:
        """Stop generating; the turn keeps what was generated so far."""
        self._segments.close()

    @property
    def reply(self) -> Reply | None:
        return self.state.reply


class Agent:
    """A persistent chat agent. Create one with `AgentManager.create`, find one with `get`."""

    def __init__(
        self,
        manager: AgentManager,
        name: str,
        system_prompt: str | None,
        messages: list[dict] | None = None,
        tokens: list[int] | None = None,
        meta: dict | None = None,
        turns: list[dict] | None = None,
    ):
        self._manager = manager
        self.name = name
        self.system_prompt = system_prompt
        self.messages: list[dict] = list(messages or [])  # user/assistant turns (the system prompt apart)
        self.tokens: list[int] = list(tokens or [])  # exactly what the cache has seen, in order
        self.meta: dict = dict(meta or {})  # the caller's own metadata
        self.turns: list[dict] = list(turns or [])  # recent TurnStats, as dicts

    def __repr__(self) -> str:
        return f"<Agent {self.name!r} messages={len(self.messages)} tokens={len(self.tokens)}>"

    def chat(
        self,
        message: str,
        *,
        max_tokens: int = 256,
        temp: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        stream: bool = False,
    ):
        """Answer `message` with the conversation so far as context.

        Args:
            message: the user's message.
            max_tokens: at most this many generated tokens.
            temp, top_p, top_k, min_p: sampling (mlx-lm's make_sampler); temp=0 is greedy.
            repetition_penalty: penalize tokens seen in the last 20 (mlx-lm's make_logits_processors).
            seed: seeds MLX's random generator first, for repeatable sampling.
            stop: a string or strings that end the reply; the text stops before the first one.
            tools: tool definitions (JSON schema dicts) for a chat template that supports them.
            chat_template_kwargs: more arguments for the chat template (e.g. enable_thinking).
            stream: return a ReplyStream of text segments instead of a Reply.

        Returns a Reply (text, tokens, stats, finish_reason), or a ReplyStream when `stream`.
        """
        options = GenerationOptions(
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
        )
        messages = self.messages + [{"role": "user", "content": message}]
        prompt = turn.render(self._manager.tokenizer, self.conversation(messages), tools, chat_template_kwargs)
        return self.respond(prompt, messages, options, stream=stream)

    def respond(
        self,
        prompt: list[int],
        messages: list[dict],
        options: GenerationOptions,
        *,
        stream: bool = False,
        own_ids: bool = True,
    ):
        """Answer an already rendered prompt; `messages` is the conversation it renders (system prompt apart).

        The lower half of `chat`, for callers that render prompts themselves (the server). `own_ids=False`
        answers `prompt` exactly as rendered, even where a recurrent-state model's agent would continue
        the ids it generated (AgentManager.start_turn).
        """
        segments, state = self._manager.start_turn(self, prompt, messages, options, own_ids=own_ids)
        if stream:
            return ReplyStream(segments, state)
        for _ in segments:
            pass
        return state.reply

    def save(self):
        """Write this agent's cache and record to the store now (only chunks the store lacks)."""
        return self._manager.save(self.name)

    @property
    def manager(self) -> AgentManager:
        """The AgentManager this agent belongs to (its model, its resident cache, its store)."""
        return self._manager

    @property
    def resident(self) -> bool:
        """Whether the agent's KV cache is in memory."""
        return self._manager.is_resident(self.name)

    @property
    def last_stats(self) -> TurnStats | None:
        return TurnStats(**self.turns[-1]) if self.turns else None

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        """What the chat template renders: the system prompt, then `messages` (default: every turn so far)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + (self.messages if messages is None else messages)

    # -- the record stored with every snapshot ---------------------------------------------------

    def record(self) -> dict:
        """The agent's JSON record (primary data: with the snapshot's tokens it rebuilds the agent)."""
        return {
            AGENT_RECORD_KEY: RECORD_VERSION,
            "system_prompt": self.system_prompt,
            "messages": self.messages,
            "meta": self.meta,
            "turns": self.turns[-KEEP_TURN_STATS:],
        }

    @classmethod
    def from_record(cls, manager: AgentManager, name: str, record: dict[str, Any], tokens: list[int]) -> Agent:
        """An Agent from a stored record and its head snapshot's tokens."""
        rec = AgentRecord.parse(record)
        return cls(manager, name, rec.system_prompt, rec.messages, tokens, rec.meta, rec.turns)
