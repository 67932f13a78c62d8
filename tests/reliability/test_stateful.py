"""A hypothesis state machine over the public API against a plain in-memory model.

Rules: save (new or replacing), incremental save after a load, load, restore, match, fork, delete,
gc and reopen. Every load and restore is bit-exact against the model's token lists (the synthetic KV
is a function of the tokens); after every step fsck is clean and agents() equals the model's names.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvstore

from . import report, synth

NAMES = st.sampled_from(["ann", "bob", "cy", "dee"])
# Token ids over the whole uint32 range (real vocabularies pass 128k; a 16-bit store would pass ids < 5,000).
TOKEN = st.one_of(st.integers(0, 4999), st.integers(0, 2**32 - 1))
STEPS = {"steps": 0, "loads": 0}
EXAMPLES = 120  # derandomized: the same 120 runs in every CI job, so a pass or a failure is reproducible


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-stateful-"))
        # durable=False: what this machine checks is the logic, not the fsyncs (test_crash does those)
        self.store = kvstore.open(self.dir / "store", chunk_size=synth.CHUNK, durable=False)
        self.agents: dict[str, list[int]] = {}
        self.labelled: dict[int, tuple[str, list[int]]] = {}

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _check(self, cache, tokens: list[int]) -> None:
        assert synth.checksum(cache) == synth.expected_sum(tokens)
        STEPS["loads"] += 1

    @rule(
        name=NAMES,
        prefix=st.integers(0, len(synth.PREFIXES) - 1),
        cut=st.integers(0, 50),
        suffix=st.lists(TOKEN, max_size=20),
        keep=st.sampled_from(["", "label", "pin"]),
    )
    def save(self, name, prefix, cut, suffix, keep):
        tokens = synth.PREFIXES[prefix][:cut] + suffix
        snap = self.store.save(
            name,
            synth.make_cache(tokens),
            tokens,
            model=synth.FP,
            label=f"L{len(self.labelled)}" if keep == "label" else None,
            pinned=keep == "pin",
        )
        self.agents[name] = tokens
        if keep:  # labelled and pinned snapshots survive every gc
            self.labelled[snap.id] = (name, tokens)

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), more=st.lists(TOKEN, min_size=1, max_size=20), seed=st.integers(0, 99))
    def save_incremental(self, data, more, seed):
        name = data.draw(st.sampled_from(sorted(self.agents)))
        cache, tokens = self.store.load(name, model=synth.FP)
        assert tokens == self.agents[name]
        new = tokens + more
        synth.extend(cache, tokens, new, random.Random(seed))
        self.store.save(name, cache, new, model=synth.FP)
        self.agents[name] = new

    @rule(name=NAMES)
    def load(self, name):
        if name not in self.agents:
            with pytest.raises(kvstore.UnknownAgentError):
                self.store.load(name, model=synth.FP)
            return
        cache, tokens = self.store.load(name, model=synth.FP)
        assert tokens == self.agents[name]
        self._check(cache, tokens)

    @precondition(lambda self: self.labelled)
    @rule(data=st.data())
    def load_labelled(self, data):
        sid = data.draw(st.sampled_from(sorted(self.labelled)))
        name, tokens = self.labelled[sid]
        cache, got = self.store.load(name, model=synth.FP, snapshot=sid)
        assert got == tokens
        self._check(cache, tokens)

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), extra=st.lists(TOKEN, max_size=5))
    def restore(self, data, extra):
        tokens = self.agents[data.draw(st.sampled_from(sorted(self.agents)))]
        ask = tokens + extra
        cache, n = self.store.restore(ask, model=synth.FP)
        assert self.store.match(ask, model=synth.FP).n_tokens == n
        if not extra:
            assert n == len(tokens)  # the exact head is always fully restorable
        if n:
            self._check(cache, ask[:n])
        else:
            assert cache is None

    @rule(src=NAMES, dst=NAMES)
    def fork(self, src, dst):
        if src not in self.agents:
            with pytest.raises(kvstore.UnknownAgentError):
                self.store.fork(src, dst)
        elif dst in self.agents:
            with pytest.raises(kvstore.AgentExistsError):
                self.store.fork(src, dst)
        else:
            self.store.fork(src, dst)
            self.agents[dst] = self.agents[src]

    @rule(name=NAMES)
    def delete(self, name):
        assert self.store.delete(name) == (name in self.agents)
        self.agents.pop(name, None)
        self.labelled = {k: v for k, v in self.labelled.items() if v[0] != name}

    @rule(keep_last=st.integers(1, 3))
    def gc(self, keep_last):
        self.store.gc(grace=0, keep_last=keep_last)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = kvstore.open(self.dir / "store", durable=False)

    @invariant()
    def consistent(self):
        STEPS["steps"] += 1
        assert sorted(a.name for a in self.store.agents()) == sorted(self.agents)
        assert self.store.fsck().problems == ()


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_zz_record_stateful_figures():
    """Runs after the machine (file order): checks it really ran and puts its counts into the figures."""
    if STEPS["steps"] == 0:
        pytest.skip("the state machine was not selected in this run")
    assert STEPS["steps"] >= EXAMPLES  # every example checked the invariants at least once
    assert STEPS["loads"] >= EXAMPLES  # and restored bit-exact caches, many times over
    report.record("stateful", examples=EXAMPLES, steps_checked=STEPS["steps"], bit_exact_restores=STEPS["loads"])
