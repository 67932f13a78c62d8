"""What the store hands back: plain frozen dataclasses, JSON-able through `as_dict`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


class _Record:
    def as_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies every value, 0.17 s of `kvstore agents` on 10,000 agents.
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]  # subclasses are dataclasses


def _plain(value):
    if isinstance(value, _Record):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@dataclass(frozen=True)
class Snapshot(_Record):
    """One saved state of an agent: its exact tokens and the chunks that hold their KV."""

    id: int
    agent: str
    model: str
    n_tokens: int
    created: float
    label: str | None = None
    pinned: bool = False
    bytes_written: int = 0  # blob bytes this save wrote (0 when every chunk was already stored); in
    # store.snapshots(): bytes of the chunks no older retained snapshot lists
    blobs_written: int = 0  # blob files this save wrote
    blobs_reused: int = 0  # blob files it would have written but found already on disk


@dataclass(frozen=True)
class Match(_Record):
    """The longest stored prefix of a token sequence."""

    n_tokens: int
    model: str
    n_chunks: int = 0
    keys: tuple = field(default=(), repr=False)


@dataclass(frozen=True)
class AgentInfo(_Record):
    name: str
    model: str
    n_tokens: int
    snapshots: int
    meta: dict
    created: float
    updated: float
    head: int | None = None


@dataclass(frozen=True)
class AgentBytes(_Record):
    """Bytes of an agent's head snapshot: unique to it (what `delete` + `gc` free) and shared with other heads."""

    unique_bytes: int
    shared_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Stats(_Record):
    path: str
    url: str
    format_version: int
    schema_revision: str
    chunk_size: int
    models: int
    agents: int
    snapshots: int
    chunks: int
    blobs: int
    bytes_on_disk: int  # bytes of every blob the index records
    logical_bytes: int  # bytes the agents' head snapshots would take stored one file per agent
    dedup_ratio: float  # logical / on disk (1.0 when nothing is shared; below 1 when old snapshots
    # that no head uses hold more than sharing saves)


@dataclass(frozen=True)
class Problem(_Record):
    kind: str  # corrupt_blob | missing_blob | orphan_file | stale_temp | dangling_ref | token_mismatch | wrong_size | chunk_owners ...
    subject: str  # the blob id, snapshot id or path it concerns
    detail: str
    repaired: bool = False


@dataclass(frozen=True)
class FsckReport(_Record):
    blobs_checked: int
    bytes_checked: int
    problems: tuple[Problem, ...]
    needs_recompute: tuple[int, ...] = ()  # snapshot ids whose KV is gone: their tokens are kept
    repaired: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not [p for p in self.problems if not p.repaired]


@dataclass(frozen=True)
class GcReport(_Record):
    dry_run: bool
    snapshots_removed: int
    chunks_removed: int
    blobs_removed: int
    files_removed: int
    temp_removed: int
    bytes_freed: int
    seconds: float = 0.0


AGENT_RECORD_KEY = "kvstore_agent"  # the key that marks an agent manager's record (its value: the record's version)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent's stored metadata read as the agent manager writes it (`kvstore.agents.Agent.record`).

    The one parser of that record. Lenient, as every reader of it was: a missing field, or one of the
    wrong type, reads as empty; metadata someone else wrote reads as a record with `by_manager` False and
    whatever of these fields it holds.
    """

    by_manager: bool  # whether the agent manager wrote it (it carries AGENT_RECORD_KEY)
    system_prompt: str | None  # the agent's role
    messages: list  # the conversation's messages ({"role": ..., "content": ...} dicts), the system prompt apart
    meta: dict  # the caller's own metadata (the server's conversation mark, the CLI's model name, ...)
    turns: list  # the last turns' statistics (TurnStats as dicts)

    @classmethod
    def parse(cls, raw: object) -> AgentRecord:
        """The record in an agent's stored metadata (a dict, as `Store.agent(name).meta` gives it)."""
        if not isinstance(raw, dict):
            return cls(False, None, [], {}, [])
        prompt, messages, meta, turns = (raw.get(k) for k in ("system_prompt", "messages", "meta", "turns"))
        return cls(
            by_manager=AGENT_RECORD_KEY in raw,
            system_prompt=prompt if prompt is None or isinstance(prompt, str) else str(prompt),
            messages=messages if isinstance(messages, list) else [],
            meta=meta if isinstance(meta, dict) else {},
            turns=turns if isinstance(turns, list) else [],
        )
