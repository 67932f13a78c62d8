"""Why the uncached part of a prompt was not cached: every response's `usage.kvstore.miss`.

A turn reads the longest prefix it can from memory or the store; the rest is prefilled. The
explanation names the first position where the prompt leaves the longest prefix anything known
holds, the segment that position falls in (system, tools, messages[N]), a little decoded text on
each side, and one reason code (`REASONS`). Runs on the model thread, after the turn's cache is in
place (the first token is out; explaining never delays it).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvstore.agents import AgentManager
from kvstore.agents import turn as turn_mod
from kvstore.ops.neighbours import nearest_stored, other_models

from .reasons import REASONS

__all__ = ["REASONS", "Graveyard", "MessageIndex", "MissExplainer", "TurnFacts", "messages_digests", "classify"]

CONTEXT_TOKENS = 12  # decoded tokens shown on each side of the first differing position
GRAVEYARD_TOKENS = 4_000_000  # tokens of dropped conversations remembered (16 MB), newest kept


def messages_digests(messages: list[dict]) -> list[str]:
    """Digest of messages[:k] for every k >= 1 (one streaming hash over canonical JSON)."""
    h = xxhash.xxh3_128()
    out = []
    for m in messages:
        h.update(json.dumps(m, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x1e")
        out.append(h.hexdigest())
    return out


class MessageIndex:
    """Conversations by the digest of their recorded messages (and of their system prompt alone).

    Each entry keeps how many tokens of a prompt those messages covered when they were rendered: the
    conversation's last prompt for its whole message list (a continuation starts with exactly that
    prompt), None for a system prompt (then the current rendering of it says).
    """

    def __init__(self) -> None:
        self._by_digest: dict[str, tuple[str, int | None]] = {}

    def add(self, name: str, digests: dict[str, int | None]) -> None:
        for d, covered in digests.items():
            self._by_digest[d] = (name, covered)

    def forget(self, name: str) -> None:
        self._by_digest = {d: v for d, v in self._by_digest.items() if v[0] != name}

    def longest(self, messages: list[dict]) -> tuple[int, str, int | None] | None:
        """(k, conversation, tokens covered) for the longest messages[:k] some conversation recorded."""
        for k, d in reversed(list(enumerate(messages_digests(messages), 1))):
            if d in self._by_digest:
                return (k, *self._by_digest[d])
        return None


@dataclass
class _Grave:
    name: str
    cause: str
    tokens: np.ndarray


class Graveyard:
    """The token histories of conversations the server dropped, newest first, bounded by tokens."""

    def __init__(self, max_tokens: int = GRAVEYARD_TOKENS):
        self.max_tokens = max_tokens
        self._graves: deque[_Grave] = deque()
        self._tokens = 0

    def bury(self, name: str, cause: str, tokens: list[int]) -> None:
        arr = np.asarray(tokens, dtype="<u4")
        self._graves.appendleft(_Grave(name, cause, arr))
        self._tokens += arr.size
        while self._tokens > self.max_tokens and self._graves:
            self._tokens -= self._graves.pop().tokens.size

    def nearest(self, prompt: np.ndarray) -> tuple[int, str, str] | None:
        """(tokens in common, name, cause) of the dropped conversation sharing most of the prompt."""
        best = None
        for g in self._graves:
            n = _common(prompt, g.tokens)
            if n and (best is None or n > best[0]):
                best = (n, g.name, g.cause)
        return best


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def classify(*, cached: int, limit: int, known: int, chunk_size: int, recurrent: bool) -> str | None:
    """The reason when a known prefix (`known` tokens) goes further than what was cached; None otherwise."""
    if cached >= limit:
        return "none"
    if known <= cached:
        return None
    if known // chunk_size * chunk_size <= cached:
        return "chunk_granularity"  # whole chunks stop here for any model
    if recurrent:
        return "hybrid_boundary"  # a whole chunk more was stored, but no state checkpoint at its end
    return "unrestorable"


@dataclass
class TurnFacts:
    """What the explainer needs of one turn."""

    prompt: list[int]
    messages: list[dict] | None  # template messages (None for a completions prompt)
    tools: list[dict] | None
    template_kwargs: dict | None
    first_index: int  # the API's index of template message 0 (-1 when Anthropic's system is message 0)
    cached: int
    conversation: str
    before: list[int]  # the conversation's tokens before the turn
    vanished: tuple[str, int] | None  # a conversation this prompt continued that was deleted behind our back


class MissExplainer:
    """Explains the misses of one model's turns (see REASONS)."""

    def __init__(self, manager: AgentManager):
        self.manager = manager
        self.store = manager.store
        self.tokenizer = manager.tokenizer
        self.graveyard = Graveyard()
        self.messages = MessageIndex()
        fresh = manager.handle.make_cache()
        self.recurrent = any(hasattr(c, "is_trimmable") and not c.is_trimmable() for c in fresh)

    def explain(self, t: TurnFacts) -> dict:
        prompt, cached = t.prompt, t.cached
        limit = len(prompt) - 1
        out: dict[str, Any] = {"uncached_tokens": len(prompt) - cached}
        if cached >= limit:
            return dict(out, reason="none", position=None)
        arr = np.asarray(prompt[:limit], dtype="<u4")
        # Each explanation reaches some way into the prompt; the one that reaches furthest is the reason.
        known, theirs, where = self._known(t, arr)
        found: list[tuple[int, int, str, int, list[int] | None, dict]] = []  # (reach, rank, reason, position, ...)
        live = classify(
            cached=cached, limit=limit, known=known, chunk_size=self.store.chunk_size, recurrent=self.recurrent
        )
        if live is not None:
            found.append((known, 0, live, known, theirs, {"stored_in": where}))
        grave = self.graveyard.nearest(arr)
        if grave is not None:
            found.append(
                (grave[0], 1, "evicted", grave[0], None, {"evicted_by": grave[2], "conversation_was": grave[1]})
            )
        if t.vanished is not None:
            n = min(t.vanished[1], limit)
            found.append((n, 1, "evicted", n, None, {"evicted_by": "deleted", "conversation_was": t.vanished[0]}))
        if t.messages:
            changed = self._template_changed(t, arr)
            if changed is not None:
                covered, shared, other, name = changed
                found.append((covered, 2, "template_changed", shared, other, {"stored_in": name}))
        for fp, hint in other_models(self.store, self.manager.fingerprints):
            n = self.store.match(arr, model=fp).n_tokens
            found.append((n, 3, "other_model", n, None, {"other_model": hint or fp}))
        found = [f for f in found if f[0] > cached]
        if found:
            _reach, _rank, reason, position, theirs, detail = max(found, key=lambda f: (f[0], -f[1]))
        else:
            reason, position, detail = "new_content", max(known, cached), {}
        out.update(reason=reason, position=position, **detail)
        out["segment"] = self._segment(t, position)
        out["context"] = (
            self._decode(prompt[max(0, position - CONTEXT_TOKENS) : position])
            + "⟦"
            + (self._decode(prompt[position : position + CONTEXT_TOKENS]))
        )
        if theirs is not None and position < len(theirs):
            out["stored_context"] = self._decode(theirs[position : position + CONTEXT_TOKENS])
        return out

    def _known(self, t: TurnFacts, arr: np.ndarray) -> tuple[int, list[int] | None, str | None]:
        """The longest prefix of the prompt that memory or the store holds: (length, those tokens, whose)."""
        mgr = self.manager
        cands = [(t.conversation, t.before)]
        cands += [(n, mgr.get(n).tokens) for n in mgr.resident() if n != t.conversation]
        best: tuple[int, list[int] | None, str | None] = (0, None, None)
        for name, toks in cands:
            n = _common(arr, np.asarray(toks, dtype="<u4"))
            if n > best[0]:
                best = (n, toks, name)
        match = self.store.match(arr, model=mgr.fingerprint)
        near = nearest_stored(self.store, arr, mgr.fingerprint, match)
        if near is not None and near[0] > best[0]:
            best = (near[0], near[2], near[1])
        return best

    def _template_changed(self, t: TurnFacts, arr: np.ndarray) -> tuple[int, int, list[int], str] | None:
        """A conversation with the same first messages whose tokens leave this prompt before those messages end:
        (tokens those messages cover, tokens shared, its tokens, its name)."""
        found = self.messages.longest(t.messages)
        if found is None:
            return None
        k, name, covered = found
        mgr = self.manager
        try:
            theirs = t.before if name == t.conversation else self.store.tokens(name)
        except Exception:  # noqa: BLE001 - dropped meanwhile: nothing to compare with
            return None
        if covered is None:  # a system prompt: it covers what its current rendering shares with this prompt
            try:
                ours = turn_mod.render(self.tokenizer, t.messages[:k], t.tools, t.template_kwargs)
            except Exception:  # noqa: BLE001 - a template that refuses a partial conversation
                return None
            covered = _common(arr, np.asarray(ours, dtype="<u4")) - 1  # (its generation prompt goes on otherwise)
        if name in mgr.resident() and name != t.conversation:
            theirs = mgr.get(name).tokens
        shared = _common(arr, np.asarray(theirs, dtype="<u4"))
        return (covered, shared, theirs, name) if shared < covered else None

    def _segment(self, t: TurnFacts, position: int) -> str:
        """Where `position` falls: system, tools, messages[N] (the API's numbering), or the generation prompt."""
        msgs = t.messages
        if not msgs:
            return "prompt"
        arr = np.asarray(t.prompt, dtype="<u4")

        def end(k: int) -> int:
            try:
                rendered = turn_mod.render(self.tokenizer, msgs[:k], t.tools, t.template_kwargs)
            except Exception:  # noqa: BLE001 - a template that refuses a partial conversation
                return -1
            return _common(arr, np.asarray(rendered, dtype="<u4"))

        lo, hi = 1, len(msgs)
        if end(hi) <= position:
            return "generation prompt"
        while lo < hi:  # the first k whose rendering reaches past position
            mid = (lo + hi) // 2
            if end(mid) > position:
                hi = mid
            else:
                lo = mid + 1
        i = lo - 1
        if i == 0 and msgs[0].get("role") == "system":
            if t.tools:
                try:
                    bare = turn_mod.render(self.tokenizer, msgs[:1], None, t.template_kwargs)
                    if position >= _common(arr, np.asarray(bare, dtype="<u4")):
                        return "tools"
                except Exception:  # noqa: BLE001
                    pass
            return "system"
        return f"messages[{i + t.first_index}]"

    def _decode(self, tokens: list[int]) -> str:
        try:
            return self.tokenizer.decode(list(tokens))
        except Exception:  # noqa: BLE001 - a token id the tokenizer cannot decode alone
            return ""
