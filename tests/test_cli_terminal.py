"""The terminal as a daily driver (issue 27): the interactive `kvstore chat` on a pseudo-terminal, `chat NAME -`,
Ctrl-C, `kvstore models`, and `kvstore serve` on a busy port or stopped by Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from server_process import ServerProcess, new_store, tiny_model

import kvstore

KVSTORE = [sys.executable, "-m", "kvstore.cli"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory)


def _controlling_tty() -> None:  # in the child: a session of its own whose terminal is the pty (Ctrl-C -> SIGINT)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _sigint_ignored() -> None:  # a background job of a script: what a CI runner may start us as
    _controlling_tty()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminal:
    """A command on a pseudo-terminal: type into it, wait for what it prints."""

    def __init__(self, args: list[str], env: dict, preexec=_controlling_tty):
        self.main, sub = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=sub, stdout=sub, stderr=sub, env={**os.environ, **env}, preexec_fn=preexec
        )
        os.close(sub)
        self.out = ""
        self.seen = 0  # expect() looks at what came after the last match

    def type(self, text: str) -> None:
        os.write(self.main, text.encode())

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait up to `timeout` seconds in all (not per read: a command that never stops printing fails too)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.out, self.seen)
            if m:
                self.seen = m.end()
                return m
            ready, _, _ = select.select([self.main], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.proc.kill()
                raise AssertionError(f"waited {timeout}s for {pattern!r}; the terminal shows:\n{self.out[-3000:]}")
            try:
                chunk = os.read(self.main, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"the command ended before {pattern!r}:\n{self.out[-3000:]}")
            self.out += chunk.decode(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        """The command's exit status once it ends, draining the pty meanwhile (so it never blocks on a full
        one); killed, and the test failed, if it is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.main], [], [], 0.2)
            try:
                chunk = os.read(self.main, 65536) if ready else b""
            except OSError:
                chunk = b""
            self.out += chunk.decode(errors="replace")
        os.close(self.main)
        if self.proc.poll() is None:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout}s; the terminal shows:\n{self.out[-3000:]}")
        return self.proc.returncode


REPLY_DONE = r"tokens at [0-9.]+/s\]"


def test_interactive_chat_history_multiline_reset_save_and_exit(tmp_path, model_path):
    store, cache = tmp_path / "s", tmp_path / "cache"
    env = {"KVSTORE_CACHE_DIR": str(cache)}
    t = Terminal(KVSTORE + ["--store", str(store), "chat", "bot", "--model", model_path, "--max-tokens", "4"], env)
    t.expect("/exit or Ctrl-D to leave")
    t.expect(">>> ")
    t.type("Hello there.\n")
    first = t.expect(r"(\d+) prompt tokens: (\d+) from the cache, \d+ prefilled; first token after \d+ ms")
    assert first.group(2) == "0"
    t.expect(REPLY_DONE)
    t.expect(">>> ")
    t.type('"""\nline one\nline two\n"""\n')  # one message of two lines
    second = t.expect(r"(\d+) prompt tokens: (\d+) from the cache")
    assert int(second.group(2)) > 0  # the first turn's cache
    t.expect(">>> ")
    t.type("/save copy\n")
    t.expect("kept a copy as agent copy")
    t.type("/reset\n")
    t.expect("a new conversation")
    t.type("Again.\n")
    t.expect(REPLY_DONE)
    t.type("/exit\n")
    assert t.wait() == 0, t.out
    with kvstore.open(store) as s:
        bot = s.agent("bot").meta["messages"]
        copy = s.agent("copy").meta["messages"]
        assert s.fsck().ok
    assert [m["content"] for m in bot if m["role"] == "user"] == ["Again."]
    assert [m["content"] for m in copy if m["role"] == "user"] == ["Hello there.", "line one\nline two"]
    assert "Hello there." in (cache / "chat_history").read_text()
    assert "Traceback" not in t.out


@pytest.mark.parametrize("started", [_controlling_tty, _sigint_ignored], ids=["from-a-shell", "sigint-ignored"])
def test_ctrl_c_stops_a_reply_then_leaves_with_130(tmp_path, model_path, started):
    """Started with SIGINT ignored (a background job of a script, as CI starts us), Ctrl-C at the prompt
    left nothing: the chat sat at the prompt and this test waited forever."""
    store = tmp_path / "s"
    env = {"KVSTORE_CACHE_DIR": str(tmp_path / "cache")}
    args = KVSTORE + ["--store", str(store), "chat", "bot", "--model", model_path, "--max-tokens", "20000"]
    t = Terminal(args, env, preexec=started)
    t.expect(">>> ")
    t.type("Tell me a long story.\n")
    t.expect(r"story\.\r?\n.")  # the reply has started streaming
    t.type("\x03")
    t.expect("stopped: the reply so far is kept")
    t.expect(">>> ")
    t.type("\x03")  # at the prompt: leave
    assert t.wait() == 130, t.out
    assert "Traceback" not in t.out and "Aborted" not in t.out
    with kvstore.open(store) as s:  # the stopped turn was saved
        assert [m["role"] for m in s.agent("bot").meta["messages"]] == ["user", "assistant"]


def test_one_shot_chat_ctrl_c_exits_130(tmp_path, model_path):
    proc = subprocess.Popen(
        KVSTORE
        + ["--store", str(tmp_path / "s"), "chat", "bot", "Go.", "--model", model_path, "--max-tokens", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(1)  # the reply is streaming
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"Aborted" not in err


def _interrupted_at_query(args: list[str], env: dict) -> tuple[int, str]:
    """Run a demo command in a process group of its own, Ctrl-C it (SIGINT to the group, as a terminal does)
    once it asks its question, and return (exit status, output)."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("Query:"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out += proc.stdout.readlines()
    return proc.wait(timeout=120), "".join(out)


@pytest.mark.slow
def test_demo_ctrl_c_exits_130_in_both_sessions(tmp_path):
    """`kvstore demo` and the process session 2 runs in (`python -m kvstore.cli.demo`) both exit 130."""
    env = {**os.environ, "KVSTORE_MODELS": str(tmp_path / "models")}
    demo = ["demo", "--model", "builtin", "--size", "tiny", "--store", str(tmp_path / "demo")]
    status, out = _interrupted_at_query(KVSTORE + demo + ["--session", "1", "--max-tokens", "3000"], env)
    assert status == 130 and "Traceback" not in out and "Aborted" not in out, out
    done = subprocess.run(KVSTORE + demo + ["--session", "1", "--max-tokens", "3"], capture_output=True, env=env)
    assert done.returncode == 0, done.stdout
    child = [sys.executable, "-m", "kvstore.cli.demo", *demo[1:], "--session", "2", "--max-tokens", "3000"]
    status, out = _interrupted_at_query(child, env)
    assert status == 130 and "Traceback" not in out, out


def test_chat_dash_reads_the_message_from_stdin(tmp_path, model_path):
    store = tmp_path / "s"
    message = "First line of a long question.\nSecond line."
    done = subprocess.run(
        KVSTORE + ["--store", str(store), "chat", "bot", "-", "--model", model_path, "--max-tokens", "3"],
        input=message + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with kvstore.open(store) as s:
        assert s.agent("bot").meta["messages"][0] == {"role": "user", "content": message}
    empty = subprocess.run(
        KVSTORE + ["--store", str(store), "chat", "bot", "-"], input="\n", capture_output=True, text=True, timeout=300
    )
    assert empty.returncode == 1 and "empty" in empty.stderr


def test_models_lists_known_and_local_models_and_fetch_checks_its_file(tmp_path, model_path):
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    env = {**os.environ, "KVSTORE_MODELS": str(models), "HF_HUB_CACHE": str(tmp_path / "hub")}
    listed = subprocess.run(
        KVSTORE + ["--store", str(tmp_path / "none"), "models", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    got = json.loads(listed.stdout)
    assert [(m["name"], m["kind"], m["path"]) for m in got["available"]] == [
        ("smollm2-135m-instruct", "known", None),
        ("builtin", "builtin", None),
        (str(models / "mine"), "local", str(models / "mine")),
    ]
    assert got["stored"] == [] and not (tmp_path / "none").exists()
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model")
    fetched = subprocess.run(
        KVSTORE + ["models", "fetch", "smollm2-135m-instruct", "--from", str(bogus)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert fetched.returncode == 1 and "not the file kvstore knows" in fetched.stderr
    assert "Traceback" not in fetched.stderr
    unknown = subprocess.run(
        KVSTORE + ["models", "fetch", "gpt-5"], capture_output=True, text=True, timeout=120, env=env
    )
    assert unknown.returncode == 2 and "smollm2-135m-instruct" in unknown.stderr


def test_serve_on_a_busy_port_fails_at_once_with_one_line(tmp_path, model_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        store = tmp_path / "s"
        done = subprocess.run(
            KVSTORE + ["--store", str(store), "serve", "--model", model_path, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"port {port}" in done.stderr and "--port" in done.stderr
    assert not store.exists()  # refused before the store was opened or the model loaded


def test_serve_ctrl_c_saves_and_exits_130(tmp_path, model_path):
    srv = ServerProcess(model_path, new_store(tmp_path / "s")).start()
    r = srv.openai().chat.completions.create(
        model=model_path, messages=[{"role": "user", "content": "Hi."}], max_tokens=3
    )
    assert r.usage.completion_tokens == 3
    assert srv.stop(signal.SIGINT) == 130
    log = Path(srv.log).read_text()
    assert "Traceback" not in log and "saved and closed the store" in log
    with kvstore.open(srv.store) as s:
        assert len(s.agents()) == 1 and s.fsck().ok
