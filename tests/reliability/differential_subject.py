"""The subject of the differential walk (differential.py): an AgentManager in a process the test SIGKILLs.

`python -m reliability.differential_subject zygote` imports mlx, mlx-lm and kvstore once, then forks
one subject per line of JSON on stdin: an AgentManager (two caches resident, so agents keep leaving
memory for the store and coming back) that reads one JSON command per line from a FIFO and answers one
`@@ {json}` line on another once the command has returned (a chat turn's answer comes after its
autosave). A restart then costs a model load, not a 2.5 s import.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
CHUNK = 16  # store chunk size: short prompts span several chunks
PREFIX = "@@ "  # marks protocol lines (anything else a library prints is ignored)


# -- the subject: a child process -----------------------------------------------------------------


def _answer(out, **fields) -> None:
    out.write(PREFIX + json.dumps(fields) + "\n")
    out.flush()


def _do(mgr, cmd: dict) -> dict:
    """Run one command on the subject's manager; the fields of its answer."""
    from kvstore import mlxfile
    from kvstore.ops import archive

    op = cmd["op"]
    if op == "chat":
        r = mgr.get(cmd["name"]).chat(cmd["message"], **cmd["options"])
        return {"tokens": list(r.tokens), "text": r.text}
    if op == "create":
        mgr.create(cmd["name"], system_prompt=cmd["system"])
    elif op == "fork":
        mgr.fork(cmd["name"], cmd["dst"])
    elif op == "delete":
        return {"existed": mgr.delete(cmd["name"])}
    elif op == "archive":  # export to an archive, import it into the same store under another name
        mgr.save(cmd["name"])
        archive.export_agent(mgr.store, cmd["name"], cmd["file"], overwrite=True)
        verify = str(mgr.handle.path) if cmd["mode"] == "verify" else None
        archive.import_agent(mgr.store, cmd["file"], name=cmd["dst"], trust=cmd["mode"] == "trust", verify=verify)
    elif op == "mlx":  # export-mlx, then import-mlx of that file as another agent
        mgr.save(cmd["name"])
        mlxfile.export_mlx_cache(mgr.store, cmd["name"], cmd["file"], overwrite=True)
        mlxfile.import_mlx_cache(mgr.store, cmd["file"], cmd["dst"], model=str(mgr.handle.path))
    elif op == "gc":
        mgr.store.gc(grace=0, keep_last=cmd["keep_last"])
    elif op == "state":  # every agent of the store: its messages and the tokens of its head
        agents = {}
        for info in mgr.list():
            agent = mgr.get(info.name)
            agents[info.name] = {"messages": agent.messages, "tokens": mgr.store.tokens(info.name)}
        return {"agents": agents}
    elif op == "close":
        mgr.close()
        mgr.store.close()
    else:
        raise ValueError(f"unknown command {op!r}")
    return {}


def serve(model: str, store_path: str, commands, out) -> None:
    """The subject's loop: one answer line per command line, until `close` or the end of `commands`."""
    import kvstore
    from kvstore.agents import AgentManager

    mgr = AgentManager(model, kvstore.open(store_path, chunk_size=CHUNK), max_resident=2)
    _answer(out, ready=True)
    for line in commands:
        cmd = json.loads(line)
        try:
            fields = _do(mgr, cmd)
        except Exception as e:  # a refusal is an answer too; the test decides whether it was allowed
            _answer(out, ok=False, error=type(e).__name__, message=str(e))
            continue
        _answer(out, ok=True, **fields)
        if cmd["op"] == "close":
            return


def zygote() -> None:
    """Import once, then fork a subject per line of JSON on stdin (a restart then costs a model load,
    not a 2.5 s import). Reports `started PID` and `exited PID CODE`. Nothing here runs mlx (no threads,
    no arrays), so forking is safe; a subject talks to the test over the two FIFOs its line names."""
    import kvstore

    kvstore.use_openblas()
    import kvstore.agents  # noqa: F401  (warm imports: mlx, mlx-lm, transformers; inherited by every fork)
    import kvstore.mlxfile  # noqa: F401
    import kvstore.ops.archive  # noqa: F401
    import kvstore.ops.archive_verify  # noqa: F401
    import kvstore.ops.gc  # noqa: F401

    for line in sys.stdin:
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sys.stdin.close()
                with open(cfg["commands"]) as commands, open(cfg["answers"], "w") as out:
                    serve(cfg["model"], cfg["store"], commands, out)
            except BaseException:
                traceback.print_exc()
                code = 3
            finally:
                os._exit(code)
        print(f"started {pid}", flush=True)
        # Reaped only here, after the test's SIGKILL or the subject's own end: the pid it kills is still ours.
        print(f"exited {pid} {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)


# -- the test side ----------------------------------------------------------------------------------


class Zygote:
    """The warm process that forks subjects (see zygote())."""

    def __init__(self, log: Path):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reliability.differential_subject", "zygote"],
            cwd=TESTS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines, str), daemon=True).start()
        self.starts = 0

    def fork(self, cfg: dict) -> int:
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        word, pid = self.next().split()
        assert word == "started"
        self.starts += 1
        return int(pid)

    def next(self) -> str:
        line = self.lines.get(timeout=600)
        if line is None:
            raise RuntimeError(f"the zygote died (exit {self.proc.wait()}); see {self.log.name}")
        return line

    def exited(self, pid: int) -> int:
        word, got, code = self.next().split()
        assert (word, int(got)) == ("exited", pid)
        return int(code)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)
        self.log.close()


def _pump(stream, into: queue.Queue, parse) -> None:
    for line in stream:
        if parse is str:
            into.put(line.strip())
        elif line.startswith(PREFIX):
            into.put(parse(line[len(PREFIX) :]))
    into.put(None)


class Subject:
    """A subject process: send a command, read its answer, or kill it while it works."""

    def __init__(self, zygote: Zygote, model: str, store: Path, work: Path):
        self.zygote = zygote
        n = zygote.starts
        fifos = {"commands": work / f"commands{n}", "answers": work / f"answers{n}"}
        for path in fifos.values():
            os.mkfifo(path)
        self.pid = zygote.fork({"model": model, "store": str(store), **{k: str(v) for k, v in fifos.items()}})
        # The subject opens commands, then answers; opened here in the same order, neither open blocks forever.
        self.commands = open(fifos["commands"], "w", buffering=1)
        answers = open(fifos["answers"])
        for path in fifos.values():
            path.unlink()
        self.lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=_pump, args=(answers, self.lines, json.loads), daemon=True).start()
        assert self.answer(300) == {"ready": True}
        self.alive = True

    def answer(self, timeout: float) -> dict | None:
        """The next answer, or None when none came within `timeout` seconds."""
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if got is None:
            raise RuntimeError(f"the subject died (exit {self.zygote.exited(self.pid)}); see {self.zygote.log.name}")
        return got

    def send(self, cmd: dict) -> None:
        self.commands.write(json.dumps(cmd) + "\n")
        self.commands.flush()

    def call(self, cmd: dict) -> dict:
        self.send(cmd)
        got = self.answer(600)
        assert got is not None, f"no answer to {cmd} in 600 s"
        return got

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.zygote.exited(self.pid) == -signal.SIGKILL
        self._closed()

    def close(self) -> None:
        assert self.call({"op": "close"}) == {"ok": True}
        assert self.zygote.exited(self.pid) == 0
        self._closed()

    def _closed(self) -> None:
        self.alive = False
        try:
            self.commands.close()
        except BrokenPipeError:
            pass  # the subject died with a command unread


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
    else:
        sys.exit("usage: python -m reliability.differential_subject zygote")
