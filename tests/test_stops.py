"""Stop-string matching (agents/stops.py): the same cuts as a plain rescan of the held-back text, in work
linear in the text generated, whatever the stop strings' length (issue 25, item 7)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.agents.stops import StopScan


class RescanOracle:
    """The matcher as it was: every feed searches the held-back text for each stop string and tests each of
    their prefixes against its end. Right, and quadratic in a stop string's length."""

    def __init__(self, stops):
        self.stops, self.pending, self.hit = tuple(stops), "", None

    def feed(self, segment: str) -> str:
        if not self.stops:
            return segment
        self.pending += segment
        found = [(i, s) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if found:
            cut, self.hit = min(found)
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def run(scan, segments: list[str]) -> tuple[list[str], str | None]:
    """What a turn hands out segment by segment (the held-back tail at the end when nothing matched)."""
    out = []
    for seg in segments:
        out.append(scan.feed(seg))
        if scan.hit:
            return out, scan.hit
    out.append(scan.flush())
    return out, None


small_text = st.text(alphabet="abc", max_size=12)


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), max_size=4),
    segments=st.lists(small_text, max_size=10),
)
def test_the_same_cuts_as_a_rescan(stops, segments):
    scan = StopScan(stops)
    got, hit = run(scan, segments)
    assert (got, hit) == run(RescanOracle(stops), segments)
    assert scan.work <= 4 * len("".join(segments)) * len(stops)  # the amortized bound of KMP with a lazy table
    text, shown = "".join(segments), "".join(got)
    if hit is None:
        assert shown == text and not any(s in text for s in stops)
    else:
        assert text.startswith(shown + hit) and not any(s in shown for s in stops)


def test_text_that_could_start_a_stop_string_is_held_back_until_it_cannot():
    scan = StopScan(["</end>", "STOP"])
    assert scan.feed("Hello </e") == "Hello "
    assert scan.pending == "</e"
    assert scan.feed("xit> ST") == "</exit> "
    assert scan.feed("OP and more") == "" and scan.hit == "STOP"


def test_work_grows_with_the_text_not_with_the_stop_strings():
    """A 1 MB stop string costs a turn what a 100-byte one does; the work stays within a few steps a character."""
    text = ("ab" * 20 + "x") * 3  # long partial matches, then a mismatch: the failure links' worst case
    segments = [text[i : i + 3] for i in range(0, len(text), 3)]
    work = {}
    for n in (50, 500_000):
        scan = StopScan(["ab" * n, "abab" + "c" * n])
        out, hit = run(scan, segments)
        assert hit is None and "".join(out) == text
        work[n] = scan.work
    assert work[50] == work[500_000]
    assert work[50] <= 4 * len(text) * 2  # two stop strings
