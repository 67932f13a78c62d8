"""The differential walk through `kvstore serve`: clients' conversations over HTTP against an oracle.

Clients keep their conversations (OpenAI-style: the whole history in every request) and send turns
through the openai SDK (streamed or not, anonymous or named with `X-Kvstore-Agent`) and the
anthropic SDK; a conversation is sometimes copied and continued two ways (a fork the server only
sees as a shared prefix), the cache is sometimes cleared (`DELETE /v1/cache`), and the server is
restarted now and then: SIGTERM, or SIGKILL while a request runs. A request the kill cut off is
simply lost, as for a real client, which sends its history again next time.

The oracle is an AgentManager in the test process, one agent per client conversation, never
restarted: every reply's text must be its reply's text.
"""

from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
from server_process import ServerProcess

import kvstore

from .differential import CHUNK, SYSTEMS, WORDS

MAX_CONVERSATIONS = 6


def as_rendered(agent, text: str, options: dict) -> str:
    """The oracle's reply to `text` as the server computes it: the conversation rendered as the request
    gives it (a recurrent-state agent would otherwise continue its own generated ids: Agent.respond)."""
    from kvstore.agents import GenerationOptions
    from kvstore.agents.turn import render

    messages = agent.messages + [{"role": "user", "content": text}]
    prompt = render(agent.manager.tokenizer, agent.conversation(messages))
    return agent.respond(prompt, messages, GenerationOptions(**options), own_ids=False).text


@dataclass
class ServerWalk:
    model: str  # a model folder
    root: Path
    seed: int
    restart_every: int = 40  # mean steps between restarts of the server
    stats: Counter = field(default_factory=Counter)
    differences: list = field(default_factory=list)

    def __post_init__(self):
        from kvstore.agents import AgentManager

        self.rng = random.Random(self.seed)
        self.oracle = AgentManager(self.model, kvstore.open(self.root / "oracle", chunk_size=CHUNK), max_resident=10**6)
        self.store = self.root / "served"
        kvstore.open(self.store, chunk_size=CHUNK).close()
        self.conversations: dict[str, dict] = {}  # oracle agent name -> {"header": name or None, "system": str}
        self.counter = 0
        self.server = self._start()
        self.next_restart = self._gap()

    def _start(self) -> ServerProcess:
        server = ServerProcess(self.model, self.store, "--max-resident", "2", log=self.root / "server.log").start()
        self.clients = {"openai": server.openai(), "anthropic": server.anthropic()}
        return server

    def _gap(self) -> int:
        return self.rng.randint(self.restart_every // 2, self.restart_every * 3 // 2)

    # -- steps -------------------------------------------------------------------------------

    def _new(self) -> str:
        self.counter += 1
        name = f"c{self.counter}"
        system = self.rng.choice(SYSTEMS)
        self.oracle.create(name, system_prompt=system)
        header = f"team-{self.counter}" if self.rng.random() < 0.3 else None
        self.conversations[name] = {"header": header, "system": system}
        return name

    def _fork(self, src: str) -> str:
        self.counter += 1
        name = f"c{self.counter}"
        self.oracle.fork(src, name)
        self.conversations[name] = dict(self.conversations[src], header=None)  # the copy is anonymous
        return name

    def _request(self, name: str, text: str, api: str) -> tuple[dict, dict]:
        """(the HTTP call's arguments, the generation options the oracle uses for them)."""
        conv, agent = self.conversations[name], self.oracle.get(name)
        max_tokens = self.rng.randint(1, 8)
        headers = {"X-Kvstore-Agent": conv["header"]} if conv["header"] else {}
        history = agent.messages + [{"role": "user", "content": text}]
        if api == "anthropic":
            call = {"max_tokens": max_tokens, "messages": history, "extra_headers": headers}  # greedy by default
            if conv["system"]:
                call["system"] = conv["system"]
            return call, {"max_tokens": max_tokens}
        penalty = self.rng.choice([None, 3.0, 3.0])  # see differential.choose: greedy Llama needs it
        call = {
            "messages": agent.conversation(history),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "extra_headers": headers,
            "extra_body": {"repetition_penalty": penalty} if penalty else {},
            "stream": api == "stream",
        }
        return call, {"max_tokens": max_tokens, "repetition_penalty": penalty}

    def _send(self, call: dict, api: str) -> str:
        if api == "anthropic":
            r = self.clients["anthropic"].messages.create(model=self.model, **call)
            return "".join(b.text for b in r.content if b.type == "text")
        r = self.clients["openai"].chat.completions.create(model=self.model, **call)
        if api == "stream":
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content or ""

    def turn(self, name: str, kill: bool = False) -> None:
        text = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 6))).capitalize() + "?"
        api = self.rng.choices(["openai", "stream", "anthropic"], [6, 2, 2])[0]
        call, options = self._request(name, text, api)
        if kill:  # SIGKILL while the request runs: the client loses the reply, and sends its history again later
            box: dict = {}
            worker = threading.Thread(target=lambda: box.setdefault("text", self._try(call, api)))
            worker.start()
            worker.join(self.rng.uniform(0.0, 0.5))
            self.server.stop(signal.SIGKILL)
            worker.join()
            self.stats["kills"] += 1
            if box.get("text") is None:
                self.stats["requests_cut_off"] += 1
                return
            got = box["text"]
        else:
            got = self._send(call, api)
        want = as_rendered(self.oracle.get(name), text, options)
        self.stats["replies_compared"] += 1
        self.stats[f"{api}_turns"] += 1
        if got != want:
            self.differences.append(
                {"step": self.stats["steps"], "conversation": name, "api": api, "got": got, "want": want}
            )

    def _try(self, call: dict, api: str) -> str | None:
        try:
            return self._send(call, api)
        except Exception:  # the connection died with the server
            return None

    def step(self) -> None:
        self.stats["steps"] += 1
        rng, names = self.rng, sorted(self.conversations)
        restart = self.stats["steps"] >= self.next_restart
        if restart:
            self.next_restart = self.stats["steps"] + self._gap()
        kind = "new" if len(names) < 2 else rng.choices(["turn", "new", "fork", "forget", "clear"], [80, 7, 6, 4, 3])[0]
        if len(names) >= MAX_CONVERSATIONS and kind in ("new", "fork"):
            kind = "forget"
        self.stats[f"{kind}_steps"] += 1
        if kind == "forget":  # the client drops a conversation (the server keeps its cache)
            name = rng.choice(names)
            del self.conversations[name]
            self.oracle.delete(name)
        elif kind == "clear":
            r = httpx.delete(self.server.url + "/v1/cache", timeout=120)
            assert r.status_code == 200, r.text
        else:
            name = (
                self._new() if kind == "new" else self._fork(rng.choice(names)) if kind == "fork" else rng.choice(names)
            )
            kill = restart and rng.random() < 0.7
            self.turn(name, kill=kill)
            if kill:
                self.server = self._start()
                return
        if restart:
            self.server.stop(signal.SIGTERM)
            self.stats["clean_restarts"] += 1
            self.server = self._start()

    def run(self, steps: int) -> Counter:
        try:
            for _ in range(steps):
                self.step()
        finally:
            if self.server.proc is not None:
                self.server.stop(signal.SIGTERM)
            self.oracle.close()
            self.oracle.store.close()
        with kvstore.open(self.store, chunk_size=CHUNK) as store:
            store.gc(grace=0)
            problems = store.fsck(grace=0).problems
            assert problems == (), problems
        return self.stats
