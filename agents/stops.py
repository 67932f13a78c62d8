"""Stop strings: hand out a streamed reply up to the first one, in time linear in the text generated.

Each stop string is followed by a Knuth-Morris-Pratt automaton whose state is the longest prefix of the
string that ends the text so far: a new character moves every state in amortized constant time, the text
that could still become a stop string is the longest of those prefixes, and the automaton's failure table
is built only as far as a state has reached. So a turn's work is proportional to its text times the number
of stop strings, never to the stop strings' length (issue 25: rescanning every prefix of a 1 MB stop
string at each token held the server's model thread for minutes).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StopScan"]


class _Matcher:
    """One stop string's automaton: `state` characters of it end the text fed so far."""

    __slots__ = ("stop", "fail", "state")

    def __init__(self, stop: str):
        self.stop = stop
        self.fail: list[int] = []  # KMP's prefix function of stop, built up to the longest state reached
        self.state = 0

    def _extend(self) -> int:
        """Append the prefix function's next entry; returns the steps it took (amortized constant)."""
        s, fail, i = self.stop, self.fail, len(self.fail)
        k, steps = (fail[i - 1] if i else 0), 0
        while k and s[i] != s[k]:
            k = fail[k - 1]
            steps += 1
        fail.append(k + 1 if i and s[i] == s[k] else 0)
        return steps + 1

    def advance(self, ch: str) -> int:
        """Feed one character; returns the steps it took."""
        s, q, steps = self.stop, self.state, 1
        while q and s[q] != ch:
            q = self.fail[q - 1]
            steps += 1
        if s[q] == ch:
            q += 1
            if q < len(s) and len(self.fail) < q:  # the table is needed up to the state (q - 1 at a mismatch)
                steps += self._extend()
        self.state = q
        return steps


class StopScan:
    """Holds back text that could be the start of a stop string, and cuts the text at the first one.

    `feed(segment)` returns what is safe to hand out; once a stop string has appeared, `hit` names it
    and the text is cut before it (the earliest start wins; among equal starts the smallest string).
    `work` counts the automata's steps, the measure of cost the tests hold to the text's length.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self._matchers = [_Matcher(s) for s in self.stops]
        self.pending = ""  # text not handed out yet: the tail a stop string could still start in
        self.hit: str | None = None
        self.work = 0

    def feed(self, segment: str) -> str:
        """The text that is safe to hand out after `segment` arrived."""
        if not self.stops:
            return segment
        if self.hit is not None:  # nothing after a stop string is handed out
            return ""
        base = len(self.pending)
        text = self.pending + segment
        first: tuple[int, str] | None = None  # (where the earliest stop string starts in text, which)
        for m in self._matchers:
            for j, ch in enumerate(segment):
                self.work += m.advance(ch)
                if m.state == len(m.stop):
                    found = (base + j + 1 - len(m.stop), m.stop)
                    first = found if first is None or found < first else first
                    break
        if first is not None:
            cut, self.hit = first
            self.pending = ""
            return text[:cut]
        hold = max(m.state for m in self._matchers)  # never more than pending: it was held back
        out = text[: len(text) - hold]
        self.pending = text[len(out) :]
        return out

    def flush(self) -> str:
        """The text held back, at the end of the reply (no stop string completed it)."""
        out, self.pending = self.pending, ""
        for m in self._matchers:
            m.state = 0
        return out
