"""The parent side of the crash campaign: drive the zygote, kill workers, and check the store after each kill.

The oracle is a plain in-memory model of what the store must hold: each agent's head token list,
and the labelled snapshots (which gc keeps). Operations whose `end` line is in the worker's log are
committed and must have survived; the one operation in flight at the kill (a `begin` without `end`)
may have gone either way, and the store must show exactly one of its two outcomes.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import kvstore

from . import synth

TESTS_DIR = Path(__file__).resolve().parent.parent
CRASH_POINTS = (
    "blob.before_rename",
    "blob.after_rename",
    "txn.before_commit",
    "txn.after_commit",
    "gc.after_rows",
    "gc.file_removed",
)


class Zygote:
    """A warm process that forks crash-harness workers on request (see harness.serve)."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
        env.pop("KVSTORE_CRASH_AT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reliability.harness", "serve"],
            cwd=TESTS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def _next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the zygote said nothing for {timeout:.0f} s") from None
        if line == "eof":
            raise RuntimeError(f"the zygote died (exit {self.proc.wait()})")
        return line

    def run(self, cfg: dict, timeout: float) -> tuple[int, bool]:
        """Run a worker: (its exit code, -9 for SIGKILL; whether the zygote killed it after `timeout` s)."""
        self.proc.stdin.write(json.dumps(dict(cfg, timeout=timeout)) + "\n")
        self.proc.stdin.flush()
        word, pid = self._next(60).split()
        assert word == "started"
        # The zygote kills the worker at `timeout`; the rest is room for a heavily loaded machine.
        word, got, code, how = self._next(timeout + 120).split()
        assert (word, got) == ("exited", pid)
        return int(code), how == "killed"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@dataclass
class Model:
    """What the store must hold: agent -> head tokens; labelled snapshot id -> (agent, tokens)."""

    agents: dict[str, list[int]] = field(default_factory=dict)
    labelled: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    counter: int = 0

    def state(self) -> dict:
        return {"agents": self.agents, "counter": self.counter}

    def commit(self, begin: dict, end: dict | None, head_id: int | None = None) -> None:
        """Apply an operation known to have committed (`end` is None for an in-flight one seen done)."""
        op, name = begin["begin"], begin.get("name")
        if op == "save":
            self.agents[name] = begin["tokens"]
            if begin.get("label"):
                self.labelled[end["id"] if end else head_id] = (name, begin["tokens"])
        elif op == "fork":
            self.agents[begin["dst"]] = self.agents[name]
        elif op == "delete":
            del self.agents[name]
            self.labelled = {k: v for k, v in self.labelled.items() if v[0] != name}


_sums: dict[tuple, str] = {}


def expected(tokens: list[int]) -> str:
    key = tuple(tokens)
    if key not in _sums:
        _sums[key] = synth.expected_sum(tokens)
    return _sums[key]


def read_log(path: Path) -> list[dict]:
    """Complete lines only: a kill may cut the last one short."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the torn last line (or the empty string after the final newline)
    return out


def replay(model: Model, records: list[dict], stats: Counter) -> dict | None:
    """Apply committed operations to the model; return the one in flight at the kill, if any."""
    pending = None
    for r in records:
        if "begin" in r:
            pending = r
            model.counter = max(model.counter, r.get("counter", 0))
            continue
        assert pending is not None and pending["begin"] == r["end"], (pending, r)
        if r["end"] == "save":  # what the worker saved is what the generator says those tokens give
            assert r["sum"] == expected(pending["tokens"]), f"worker's cache for {pending['name']} is off"
        model.commit(pending, r)
        stats[f"committed_{r['end']}"] += 1
        pending = None
    return pending


def _resolve(store: kvstore.Store, model: Model, inflight: dict | None, stats: Counter) -> None:
    """Decide which outcome the in-flight operation had; it must be exactly one of the two."""
    if inflight is None:
        return
    op, name = inflight["begin"], inflight.get("name")
    present = {a.name: a for a in store.agents()}
    done = False
    if op == "save":
        if name in present:
            _, toks = store.load(name, model=synth.FP)
            if toks == inflight["tokens"]:
                done = True
            else:
                assert name in model.agents and toks == model.agents[name], f"{name}: neither old nor new head"
        else:
            assert name not in model.agents, f"agent {name} vanished during a save"
    elif op == "fork":
        done = inflight["dst"] in present
    elif op == "delete":
        done = name not in present
    if done:
        model.commit(inflight, None, head_id=present[name].head if op == "save" else None)
    stats[f"inflight_{op}" if op == "gc" else f"inflight_{op}_{'committed' if done else 'rolled_back'}"] += 1


def check_store(path: Path, model: Model, inflight: dict | None, rng: random.Random, stats: Counter) -> None:
    """After a kill: every committed snapshot restores bit-exact; gc(grace=0) then fsck() is clean."""
    # With the worker's settings: a worker killed before its first commit leaves a folder to create.
    with kvstore.open(path, chunk_size=synth.CHUNK) as store:
        _resolve(store, model, inflight, stats)
        assert sorted(a.name for a in store.agents()) == sorted(model.agents)
        for name, tokens in model.agents.items():
            cache, toks = store.load(name, model=synth.FP)
            assert toks == tokens, f"agent {name}: head has {len(toks)} tokens, committed {len(tokens)}"
            assert synth.checksum(cache) == expected(tokens), f"agent {name}: restored cache differs"
            stats["heads_verified"] += 1
        for sid, (name, tokens) in model.labelled.items():
            cache, toks = store.load(name, model=synth.FP, snapshot=sid)
            assert toks == tokens and synth.checksum(cache) == expected(tokens), f"labelled snapshot {sid}"
            stats["labelled_verified"] += 1
        if model.agents:
            tokens = model.agents[rng.choice(sorted(model.agents))]
            cache, n = store.restore(tokens, model=synth.FP)
            assert n == len(tokens) and synth.checksum(cache) == expected(tokens)
        store.gc(grace=0)
        report = store.fsck(grace=0)
        assert report.problems == (), report.problems
        assert list(store.blobs.iter_temp()) == []
        for name, tokens in model.agents.items():  # gc kept what every head needs
            cache, toks = store.load(name, model=synth.FP)
            assert toks == tokens and synth.checksum(cache) == expected(tokens)


def campaign(root: Path, kills: int, seed: int) -> Counter:
    """Run workers against one store and SIGKILL each; check the store after every kill."""
    rng = random.Random(seed)
    store_dir, work = root / "store", root / "work"
    work.mkdir(parents=True, exist_ok=True)
    model, stats = Model(), Counter()
    zygote = Zygote()
    try:
        for i in range(kills):
            state, log, err = work / "state.json", work / f"log{i}.jsonl", work / "err.txt"
            state.write_text(json.dumps(model.state()))
            crash_at = None
            if rng.random() < 0.6:
                point = rng.choice(CRASH_POINTS)
                crash_at = f"{point}@{rng.randint(1, 12 if point.startswith('blob') else 4)}"
            cfg = {
                "store": str(store_dir),
                "state": str(state),
                "log": str(log),
                "err": str(err),
                "seed": rng.getrandbits(32),
                "crash_at": crash_at,
            }
            code, by_timer = zygote.run(cfg, 1.0 if crash_at else rng.uniform(0.02, 0.3))
            if by_timer:
                stats["killed_by_timer"] += 1
            else:
                stats[f"killed_at_{crash_at.split('@')[0]}" if crash_at else "exited_alone"] += 1
            if code != -signal.SIGKILL:
                detail = err.read_text() if err.exists() else ""
                raise AssertionError(f"worker {i} exited with {code}, not by SIGKILL:\n{detail}")
            inflight = replay(model, read_log(log), stats)
            check_store(store_dir, model, inflight, rng, stats)
            stats["kills"] += 1
            log.unlink(missing_ok=True)  # a worker killed before it opened its log never made one
    finally:
        zygote.close()
    return stats
