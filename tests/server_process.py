"""A `kvstore serve` process for the server tests: started on a free loopback port, stopped by signal, and
driven through the official openai and anthropic SDKs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai and anthropic SDKs are built on
from conftest import TEST_CHUNK

import kvstore

SYSTEM = "You are a careful assistant. " * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kvstore.server` on a free loopback port, its log in a file."""

    def __init__(self, model: str, store: Path | str, *args: str, log: Path | None = None, env: dict | None = None):
        self.model, self.store, self.args, self.env = model, store, list(args), env
        self.port = free_port()
        self.log = log or Path(store).parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "kvstore.server",
            "--model",
            self.model,
            "--store",
            str(self.store),
            "--port",
            str(self.port),
            "--min-free-disk",
            "0",
            *self.args,
        ]
        self._log = open(self.log, "ab")
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        self.proc = None
        return rc

    def openai(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def anthropic(self, key: str = "none"):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def stats(self, **headers) -> dict:
        return httpx.get(self.url + "/v1/cache/stats", headers=headers, timeout=60).json()


def tiny_model(tmp_path_factory, arch: str = "llama") -> str:
    """The built-in random-weight model of `arch`, tiny, built under a pytest temp folder."""
    from kvstore.models.builtin import builtin_model_path

    return str(builtin_model_path(arch=arch, size="tiny", root=tmp_path_factory.mktemp(f"models-{arch}")))


def new_store(path: Path) -> Path:
    kvstore.open(path, chunk_size=TEST_CHUNK).close()  # small chunks: short prompts span several
    return path


def chat(model: str, *turns: str) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def ask(client, model: str, msgs: list[dict], turn: int, **kw):
    """Turn `turn` of the standard conversation: its question appended to msgs, the reply too; the response."""
    msgs.append({"role": "user", "content": f"Question number {turn}: what next?"})
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, **kw)
    msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    return r


def conversation(client, model: str, turns: int, system: str = SYSTEM, **kw) -> list[tuple[str, object]]:
    """`turns` turns of one conversation; returns (reply text, usage) per turn."""
    msgs = [{"role": "system", "content": system}]
    out = []
    for i in range(turns):
        r = ask(client, model, msgs, i, **kw)
        out.append((r.choices[0].message.content, r.usage))
    return out
