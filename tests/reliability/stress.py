"""Concurrent savers and a looping gc against one store, as processes (`python -m reliability.stress`) or threads.

A saver saves agents whose prompts share prefixes with every other saver's (synth.PREFIXES), half of
the time as an incremental save after a load, and after every save loads another saver's agent and
restores a prefix: both must come back bit-exact for the tokens they report. It returns its agents'
last committed token lists so the parent can check that nothing committed was lost.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import traceback
from pathlib import Path

import kvstore

from . import synth


def saver(store: kvstore.Store, worker: int, saves: int, seed: int) -> dict:
    """`saves` saves of this worker's agents; returns {"agents": {name: tokens}, "checks": n}."""
    rng = random.Random(seed)
    heads: dict[str, list[int]] = {}
    caches: dict[str, list] = {}
    checks = 0
    for i in range(saves):
        if len(heads) < 4 or rng.random() < 0.3:
            name, tokens = f"w{worker}-{i}", synth.agent_tokens(rng)
            cache = synth.make_cache(tokens)
        else:
            name = rng.choice(sorted(heads))
            cache = caches.pop(name, None)
            if cache is None or rng.random() < 0.5:  # come back from the store, as after a restart
                cache, got = store.load(name, model=synth.FP)
                assert got == heads[name], f"{name}: the store lost a committed save"
            tokens = heads[name] + [rng.randrange(5000) for _ in range(rng.randint(1, 12))]
            synth.extend(cache, heads[name], tokens, rng)
        store.save(name, cache, tokens, model=synth.FP, meta={"worker": worker})
        heads[name], caches[name] = tokens, cache
        checks += _check_someone(store, rng)
    return {"agents": heads, "checks": checks}


def _check_someone(store: kvstore.Store, rng: random.Random) -> int:
    """Load any agent and restore a prefix of it: whatever comes back must match its tokens bit for bit."""
    agents = store.agents()
    if not agents:
        return 0
    name = rng.choice(agents).name
    cache, tokens = store.load(name, model=synth.FP)  # nothing deletes agents here: it must be there
    assert synth.checksum(cache) == synth.expected_sum(tokens), f"load({name}) gave a wrong cache"
    ask = tokens[: rng.randint(1, len(tokens))] if tokens else []
    cache, n = store.restore(ask, model=synth.FP)
    assert n == 0 or synth.checksum(cache) == synth.expected_sum(ask[:n]), "restore gave a wrong cache"
    return 2


def collector(store: kvstore.Store, stop, grace: float = 0.0) -> int:
    """gc(grace) in a loop until `stop()`; returns the number of passes."""
    passes = 0
    while not stop():
        store.gc(grace=grace, keep_last=1)
        passes += 1
    return passes


def run_threads(path: Path | str, workers: int, saves: int, seed: int, **open_kw) -> dict:
    """Savers and a gc as threads sharing one Store; returns what each saver committed and the gc passes.
    `path` and `open_kw` go to kvstore.open (a PostgreSQL URL and blobs= for the shared-store tests)."""
    results: dict = {}
    errors: list[str] = []
    done = threading.Event()

    def guard(key, fn, *args):
        try:
            results[key] = fn(*args)
        except BaseException:
            errors.append(traceback.format_exc())

    open_kw.setdefault("chunk_size", synth.CHUNK)
    with kvstore.open(path, **open_kw) as store:
        gc_thread = threading.Thread(target=guard, args=("gc", collector, store, done.is_set))
        gc_thread.start()
        threads = [threading.Thread(target=guard, args=(w, saver, store, w, saves, seed + w)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        gc_thread.join()
    assert not errors, "\n".join(errors)
    return results


def main(argv: list[str]) -> int:
    """`saver PATH WORKER SAVES SEED OUT` or `gc PATH STOPFILE OUT`: run one role, write its result as JSON."""
    role, path = argv[0], Path(argv[1])
    try:
        with kvstore.open(path, chunk_size=synth.CHUNK) as store:
            if role == "saver":
                worker, saves, seed, out = int(argv[2]), int(argv[3]), int(argv[4]), Path(argv[5])
                result = saver(store, worker, saves, seed)
            else:
                stop, out = Path(argv[2]), Path(argv[3])
                started = time.time()
                result = {"passes": collector(store, stop.exists), "seconds": round(time.time() - started, 2)}
    except BaseException:
        sys.stderr.write(traceback.format_exc())
        return 1
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
