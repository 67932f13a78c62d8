"""The system-level differential walk: the agent manager in a child process that is SIGKILLed, against an oracle.

The *subject* is an AgentManager in a process forked from a warm zygote (differential_subject.py),
driven one JSON command at a time. The test kills it with SIGKILL, mid-command or between commands,
and forks another on the same store.

The *oracle* is an AgentManager in the test process on a store of its own, with every agent resident,
that is never restarted and never collects garbage: it does the same operations, and every subject
reply must have exactly its token ids. A command in flight at a kill may have committed or not; the
restarted subject's state says which, and the oracle then does it too (a committed chat's stored
reply must be the oracle's) or skips it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .differential_subject import CHUNK, Subject, Zygote

WORDS = (
    "the agent read the report and asked why the cache was slow so we wrote a test fixed one line "
    "then measured again memory matters for every team plan".split()
)
SYSTEMS = (
    None,
    "You are a careful assistant. Answer in one short sentence.",
    "You are a code reviewer. Read the patch, find the bug, and say how to fix it. Be brief.",
)
MAX_AGENTS = 6


@dataclass
class Walk:
    """One seeded walk: the oracle's agents (the truth), the subject, and what was compared."""

    model: str  # a model folder (a built-in model's)
    root: Path
    seed: int
    kill_every: int = 50  # mean steps between restarts of the subject
    stats: Counter = field(default_factory=Counter)
    differences: list = field(default_factory=list)

    def __post_init__(self):
        import kvstore
        from kvstore.agents import AgentManager

        self.rng = random.Random(self.seed)
        self.store = self.root / "subject"
        self.oracle = AgentManager(self.model, kvstore.open(self.root / "oracle", chunk_size=CHUNK), max_resident=10**6)
        self.counter = 0
        self.zygote = Zygote(self.root / "subject.log")
        self.subject = self._subject()
        self.next_restart = self._gap()

    def _subject(self) -> Subject:
        return Subject(self.zygote, self.model, self.store, self.root)

    def _gap(self) -> int:
        return self.rng.randint(self.kill_every // 2, self.kill_every * 3 // 2)

    # -- choosing a step --------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(a.name for a in self.oracle.list())

    def _new_name(self) -> str:
        self.counter += 1
        return f"a{self.counter}"

    def choose(self) -> dict:
        rng, names = self.rng, self.names()
        if len(names) < 2:
            kind = "create"
        else:
            weights = {"chat": 70, "create": 6, "fork": 5, "delete": 4, "archive": 4, "mlx": 4, "gc": 4}
            if len(names) >= MAX_AGENTS:
                weights.update(create=0, fork=0, archive=0, mlx=0, delete=12)
            kind = rng.choices(list(weights), list(weights.values()))[0]
        if kind == "create":
            return {"op": "create", "name": self._new_name(), "system": rng.choice(SYSTEMS)}
        if kind == "gc":
            return {"op": "gc", "keep_last": rng.choice([1, 1, 2])}
        name = rng.choice(names)
        if kind == "mlx" and not self.oracle.get(name).tokens:
            kind = "chat"  # export-mlx of an agent that has seen no token writes a file import-mlx refuses
        if kind == "chat":
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            # Greedy. The built-in Llama's greedy reply is its last prompt token repeated, whatever the
            # context (tied embeddings, small weights); a repetition penalty makes it depend on the KV.
            options = {"max_tokens": rng.randint(1, 8), "repetition_penalty": rng.choice([None, 3.0, 3.0])}
            return {"op": "chat", "name": name, "message": words.capitalize() + "?", "options": options}
        if kind == "delete":
            return {"op": "delete", "name": name}
        cmd = {"op": kind, "name": name, "dst": self._new_name()}
        if kind in ("archive", "mlx"):
            cmd["file"] = str(self.root / ("agent.kvs" if kind == "archive" else "agent.safetensors"))
        if kind == "archive":
            cmd["mode"] = rng.choice(["apart", "trust", "verify"])
        return cmd

    # -- the oracle's side of a step --------------------------------------------------------

    def apply(self, cmd: dict) -> dict | None:
        """Do `cmd` on the oracle; the answer its subject must give (None: any success)."""
        op = cmd["op"]
        if op == "chat":
            r = self.oracle.get(cmd["name"]).chat(cmd["message"], **cmd["options"])
            return {"ok": True, "tokens": list(r.tokens), "text": r.text}
        if op == "create":
            self.oracle.create(cmd["name"], system_prompt=cmd["system"])
        elif op in ("fork", "archive"):  # an archive imported under another name is a copy of the agent
            self.oracle.fork(cmd["name"], cmd["dst"])
        elif op == "mlx":  # an mlx-lm file holds KV and token ids only: an agent without a record
            self.oracle.create(cmd["dst"])
        elif op == "delete":
            return {"ok": True, "existed": self.oracle.delete(cmd["name"])}
        return None

    def compare(self, cmd: dict, got: dict, want: dict | None) -> None:
        self.stats[f"{cmd['op']}_steps"] += 1
        if want is None:
            want = {"ok": True}
        if cmd["op"] == "mlx" and got.get("error") == "UnsupportedCacheError":
            self.oracle.delete(cmd["dst"])  # a clear refusal (a cache class mlx-lm files cannot bring in)
            self.stats["mlx_refused"] += 1
            return
        if cmd["op"] == "chat":
            self.stats["replies_compared"] += 1
            self.stats["reply_tokens_compared"] += len(want["tokens"])
        if got != want:
            self.differences.append({"step": self.stats["steps"], "cmd": cmd, "subject": got, "oracle": want})

    # -- a step, and a restart --------------------------------------------------------------

    def step(self) -> None:
        cmd = self.choose()
        self.stats["steps"] += 1
        if self.stats["steps"] < self.next_restart:
            got = self.subject.call(cmd)
            self.compare(cmd, got, self.apply(cmd))
            return
        self.next_restart = self.stats["steps"] + self._gap()
        if self.rng.random() < 0.2:  # a clean shutdown now and then
            got = self.subject.call(cmd)
            self.compare(cmd, got, self.apply(cmd))
            self.subject.close()
            self.stats["clean_restarts"] += 1
            self._restart(None)
            return
        self.subject.send(cmd)
        got = self.subject.answer(self.rng.uniform(0.0, 0.4))  # SIGKILL mid-command, or just after it
        self.subject.kill()
        self.stats["kills"] += 1
        if got is not None and self.rng.random() < 0.5:
            self.stats["kills_after_answer"] += 1
            self.compare(cmd, got, self.apply(cmd))
            self._restart(None)
        else:  # no answer, or one dropped as a client that died with the subject would: the store decides
            self._restart(cmd)

    def _restart(self, inflight: dict | None) -> None:
        """After the subject stopped: the store is collectable and clean; a new subject agrees with the oracle."""
        import kvstore

        with kvstore.open(self.store, chunk_size=CHUNK) as store:
            store.gc(grace=0)  # what a killed save left behind (temp files, unreferenced blobs) goes
            problems = store.fsck(grace=0).problems
            assert problems == (), problems
            self.stats["fsck_clean"] += 1
        self.subject = self._subject()
        state = self.subject.call({"op": "state"})["agents"]
        if inflight is not None:
            self._resolve(inflight, state)
        self.check_state(state)

    def _resolve(self, cmd: dict, state: dict) -> None:
        """The command killed in flight: if the store shows it done, the oracle does it too."""
        op, name = cmd["op"], cmd.get("name")
        if op == "chat":
            done = name in state and len(state[name]["messages"]) > len(self.oracle.get(name).messages)
        elif op in ("create", "fork", "archive", "mlx"):
            done = cmd.get("dst", name) in state
        elif op == "delete":
            done = name not in state
        else:
            done = True  # gc changes no agent
        self.stats[f"inflight_{'committed' if done else 'rolled_back'}"] += 1
        if not done:
            return
        want = self.apply(cmd)
        if op == "chat":  # its reply is lost with the process, but the store recorded its text
            self.stats["replies_compared"] += 1
            if state[name]["messages"][-1]["content"] != want["text"]:
                self.differences.append(
                    {"step": self.stats["steps"], "cmd": cmd, "stored": state[name], "oracle": want}
                )

    def check_state(self, state: dict) -> None:
        """The subject's store holds exactly the oracle's agents, with the same conversations and tokens."""
        if sorted(state) != self.names():  # the walks have parted: stop here, with what led to it
            raise AssertionError(
                f"agents {sorted(state)} != oracle's {self.names()}; differences: {self.differences[:3]}"
            )
        for name, got in state.items():
            agent = self.oracle.get(name)
            want = {"messages": agent.messages, "tokens": agent.tokens}
            if not agent.messages:  # an agent that has not talked yet: an import-mlx one keeps its file's tokens
                got, want = got["messages"], want["messages"]
            if got != want:
                self.differences.append({"step": self.stats["steps"], "state_of": name, "subject": got, "oracle": want})
            self.stats["states_compared"] += 1

    def run(self, steps: int) -> Counter:
        try:
            for _ in range(steps):
                self.step()
            self.subject.close()
            self._restart(None)  # a final restart: everything the walk did is in the store
            self.subject.close()
        finally:
            if self.subject.alive:
                self.subject.kill()
            self.zygote.close()
            self.oracle.close()
            self.oracle.store.close()
        return self.stats
