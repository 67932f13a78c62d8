"""The crash-injection child: a worker loop over store operations that the test kills with SIGKILL.

`python -m reliability.harness serve` starts a *zygote*: it imports mlx, mlx-lm and kvstore once, then
forks one worker per line of JSON it reads on stdin, SIGKILLs it once the line's `timeout` has passed,
and reports `started PID` / `exited PID STATUS killed|alone` on stdout. The zygote kills its own child
before reaping it, so the pid cannot have been reaped, let alone reused, when the signal is sent (a
parent-side kill raced the worker's own death: ProcessLookupError under heavy load). Forking from a warm process makes a kill cycle cost milliseconds instead of a 2 s import,
which is what lets the default run afford hundreds of kills. The zygote itself never touches mlx
(no threads, no arrays), so forking it is safe.

A worker opens the store, arms its crash point (kvstore._crash), and loops over save (new agent,
or incremental after a load), fork, delete and gc forever. Around every operation it appends one
JSON line to its log *before* (`begin`) and *after the call returned* (`end`), with one `os.write`
each; the parent reads the log after the kill to know what was committed and what was in flight.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback

MAX_AGENTS = 8
MAX_TOKENS = 150


def _log(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


def _choose(rng: random.Random, agents: dict) -> str:
    if len(agents) < 2:
        return "new"
    if len(agents) >= MAX_AGENTS:
        return rng.choice(["delete", "delete", "extend", "gc"])
    return rng.choices(["new", "extend", "fork", "delete", "gc", "load"], [25, 40, 8, 8, 9, 10])[0]


def run_worker(cfg: dict) -> None:
    """The worker's loop; returns only when it has done cfg['max_ops'] operations (else it is killed)."""
    import kvstore
    from kvstore import _crash

    from . import synth

    rng = random.Random(cfg["seed"])
    with open(cfg["state"]) as f:
        state = json.load(f)
    agents: dict[str, list[int]] = {k: v for k, v in state["agents"].items()}
    counter = state["counter"]
    caches: dict[str, list] = {}
    fd = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = kvstore.open(cfg["store"], chunk_size=synth.CHUNK)
    _crash.arm(cfg.get("crash_at"))
    for _ in range(cfg.get("max_ops", 10**9)):
        op = _choose(rng, agents)
        if op == "new":
            counter += 1
            name, tokens = f"a{counter}", synth.agent_tokens(rng)
            label = f"keep{counter}" if rng.random() < 0.15 else None
            cache = synth.make_cache(tokens)
            _log(fd, {"begin": "save", "name": name, "tokens": tokens, "label": label, "counter": counter})
            snap = store.save(name, cache, tokens, model=synth.FP, label=label, meta={"n": len(tokens)})
            _log(fd, {"end": "save", "id": snap.id, "sum": synth.checksum(cache)})
            agents[name], caches[name] = tokens, cache
        elif op == "extend":
            name = rng.choice(sorted(agents))
            old = agents[name]
            if len(old) >= MAX_TOKENS:
                continue
            cache = caches.pop(name, None)
            if cache is None:  # as after a restart: the agent comes back from the store
                cache, got = store.load(name, model=synth.FP)
                if got != old:
                    raise AssertionError(f"load({name}) gave {len(got)} tokens, expected {len(old)}")
            new = old + [rng.randrange(5000) for _ in range(rng.randint(1, 20))]
            synth.extend(cache, old, new, rng)
            label = f"keep{name}-{len(new)}" if rng.random() < 0.05 else None
            _log(fd, {"begin": "save", "name": name, "tokens": new, "label": label})
            snap = store.save(name, cache, new, model=synth.FP, label=label)
            _log(fd, {"end": "save", "id": snap.id, "sum": synth.checksum(cache)})
            agents[name], caches[name] = new, cache
        elif op == "fork":
            counter += 1
            src, dst = rng.choice(sorted(agents)), f"a{counter}"
            _log(fd, {"begin": "fork", "name": src, "dst": dst, "counter": counter})
            snap = store.fork(src, dst)
            _log(fd, {"end": "fork", "id": snap.id})
            agents[dst] = agents[src]
        elif op == "delete":
            name = rng.choice(sorted(agents))
            _log(fd, {"begin": "delete", "name": name})
            existed = store.delete(name)
            _log(fd, {"end": "delete", "existed": existed})
            del agents[name]
            caches.pop(name, None)
        elif op == "gc":
            grace, keep = rng.choice([0, 0, 3600]), rng.choice([1, 1, 2])
            _log(fd, {"begin": "gc", "grace": grace, "keep_last": keep})
            report = store.gc(grace=grace, keep_last=keep)
            _log(fd, {"end": "gc", "files": report.files_removed})
        else:  # a restore of some agent's tokens plus a new turn: must be right whatever its length
            name = rng.choice(sorted(agents))
            ask = agents[name] + [rng.randrange(5000) for _ in range(rng.choice([0, 0, 3]))]
            cache, n = store.restore(ask, model=synth.FP)
            # The exact head tokens are stored in full; a longer ask may stop earlier (sliding-window layer).
            if (ask == agents[name] and n != len(ask)) or (n and synth.checksum(cache) != synth.expected_sum(ask[:n])):
                raise AssertionError(f"restore of {name}'s {len(ask)} tokens gave a wrong cache ({n} tokens)")
    store.close()


def serve() -> None:
    """The zygote: fork a worker per JSON line on stdin, report its pid and its exit status."""
    import mlx.core  # noqa: F401
    import mlx_lm.models.cache  # noqa: F401

    import kvstore  # noqa: F401  (warm imports, inherited by every fork)
    import kvstore.ops.gc
    import kvstore.ops.restore
    import kvstore.ops.save
    import kvstore.store  # noqa: E401,F401 (import kvstore is lazy)

    from . import synth  # noqa: F401

    out = sys.stdout
    for line in sys.stdin:
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sys.stdin.close()
                run_worker(cfg)
            except BaseException:
                with open(cfg["err"], "w") as f:
                    f.write(traceback.format_exc())
                code = 3
            finally:
                os._exit(code)
        out.write(f"started {pid}\n")
        out.flush()
        status, killed = _wait_or_kill(pid, cfg["timeout"])
        out.write(f"exited {pid} {os.waitstatus_to_exitcode(status)} {'killed' if killed else 'alone'}\n")
        out.flush()


POLL = 0.002  # seconds between looks at a running worker


def _wait_or_kill(pid: int, timeout: float) -> tuple[int, bool]:
    """(wait status, whether we killed it): the worker's end, or SIGKILL once `timeout` seconds have passed.

    The child stays unreaped until waitpid returns its status, so the kill can only reach our own worker.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status, False
        time.sleep(POLL)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1], True


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.exit("usage: python -m reliability.harness serve")
