"""The `kvstore` command through click's CliRunner, on real stores of real mlx-lm caches (issue 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from byte_oracle import recount_bytes
from click.testing import CliRunner
from conftest import TEST_CHUNK

import kvstore
from kvstore.cli.main import cli
from kvstore.testing import make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "c1" * 16


def run(args, store=None, code=0, env=None):
    """Invoke the CLI; check the exit status; return the result (stdout and stderr apart)."""
    argv = (["--store", str(store)] if store is not None else []) + list(args)
    result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=False)
    assert result.exit_code == code, (argv, result.exit_code, result.stdout, result.stderr)
    return result


def run_json(args, store):
    return json.loads(run(list(args) + ["--json"], store).stdout)


def one_line_error(result, *words):
    """The error is one `kvstore: error:` line on stderr, never a traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0]


@pytest.fixture
def home(tmp_path) -> Path:
    """A store: 'tech' and 'biz' share a 3-chunk prefix, 'tech-2' forks tech, 'old' has two snapshots."""
    path = tmp_path / "store"
    with kvstore.open(path, chunk_size=C) as store:
        prefix = tokens(3 * C, seed=1)
        for name, seed, extra in (("tech", 2, C + 5), ("biz", 3, 9)):
            t = prefix + tokens(extra, seed=seed)
            store.save(name, make_cache("kv", len(t), seed=seed), t, model=FP, meta={"role": name})
        store.fork("tech", "tech-2")
        t = tokens(2 * C + 1, seed=7)
        store.save("old", make_cache("kv", len(t), seed=7), t, model=FP)
        t2 = t[:C] + tokens(C + 3, seed=8)
        store.save("old", make_cache("kv", len(t2), seed=8), t2, model=FP)
    return path


def oracle_bytes(path: Path) -> dict[str, dict[str, int]]:
    """Unique/shared bytes per agent recounted from plain rows and the blob files' sizes on disk."""
    with kvstore.open(path) as store:
        return recount_bytes(store, from_files=True)[0]


def test_every_command_has_help():
    assert run(["--help"]).stdout.startswith("Usage: ")
    names = sorted(cli.commands)
    assert names == sorted(
        [
            "info",
            "agents",
            "show",
            "models",
            "du",
            "explain",
            "fsck",
            "gc",
            "rm",
            "fork",
            "export",
            "import",
            "migrate",
            "demo",
            "init",
            "chat",
            "import-mlx",
            "export-mlx",
            "serve",
        ]
    )
    for name in names:
        out = run([name, "--help"]).stdout
        assert out.startswith("Usage: ") and name in out.splitlines()[0]
        doc = cli.commands[name].help.split("\n")[0]
        assert " ".join(doc.split()[:4]) in " ".join(out.split())


def test_read_commands_take_json():
    read = {"info", "agents", "show", "models", "du", "explain", "fsck", "gc", "migrate"}
    for name in read:
        assert "--json" in [o for p in cli.commands[name].params for o in getattr(p, "opts", [])], name


def test_help_demo_and_missing_store_create_nothing(tmp_path):
    home = tmp_path / "nothing-here"
    env = {"KVSTORE_HOME": str(home)}
    run(["--help"], env=env)
    run(["demo", "--help"], env=env)
    run(["info", "--help"], env=env)
    status = json.loads(run(["migrate", "--status", "--json"], env=env).stdout)
    assert status["exists"] is False and status["head"] == kvstore.index.schema.SCHEMA_REVISION
    one_line_error(run(["info"], env=env, code=1), "no store at", str(home))
    assert not home.exists()


def test_info_json_equals_store_stats(home):
    got = run_json(["info"], home)
    with kvstore.open(home) as store:
        assert got == dict(store.stats().as_dict(), writes_by_day=store.writes_by_day())
        assert sum(got["writes_by_day"].values()) == got["bytes_on_disk"]  # every blob was written once, none gone
    assert got["agents"] == 4 and got["snapshots"] == 5 and got["models"] == 1
    assert got["logical_bytes"] == sum(v["total_bytes"] for v in oracle_bytes(home).values())
    human = run(["info"], home).stdout
    for word in ("chunk size", "16 tokens", "dedup ratio", f"{got['dedup_ratio']:.2f}x", str(home)):
        assert word in human


def test_agents_json_equals_library_and_oracle(home):
    rows = run_json(["agents"], home)
    expected = oracle_bytes(home)
    with kvstore.open(home) as store:
        infos = [a.as_dict() for a in store.agents()]
    assert [{k: r[k] for k in infos[0]} for r in rows] == infos
    assert {r["name"]: {k: r[k] for k in ("unique_bytes", "shared_bytes", "total_bytes")} for r in rows} == expected
    assert expected["tech"]["unique_bytes"] == 0  # tech-2 shares all of it
    assert expected["biz"]["shared_bytes"] > 0 and expected["biz"]["unique_bytes"] > 0
    human = run(["agents"], home).stdout.splitlines()
    assert human[0].split() == ["AGENT", "MODEL", "TOKENS", "SNAPSHOTS", "UNIQUE", "SHARED", "LAST", "SAVED"]
    assert [line.split()[0] for line in human[1:]] == ["biz", "old", "tech", "tech-2"]


def test_show_chunk_map_names_the_sharers(home):
    got = run_json(["show", "tech"], home)
    assert got["agent"]["name"] == "tech" and got["agent"]["n_tokens"] == 4 * C + 5
    assert [s["n_tokens"] for s in got["snapshots"]] == [4 * C + 5]
    runs = [(r["first"], r["last"], r["start"], r["end"], r["shared_with"]) for r in got["chunk_map"]]
    assert runs == [(0, 2, 0, 3 * C, ["biz", "tech-2"]), (3, 4, 3 * C, 4 * C + 5, ["tech-2"])]
    assert sum(r["bytes"] for r in got["chunk_map"]) == oracle_bytes(home)["tech"]["total_bytes"]
    human = run(["show", "tech"], home).stdout
    assert "biz, tech-2" in human and "0-2" in human and "head" in human
    old = run_json(["show", "old"], home)
    assert len(old["snapshots"]) == 2 and old["agent"]["head"] == old["snapshots"][1]["id"]


def test_models_and_du(home):
    models = run_json(["models"], home)["stored"]
    assert [(m["fingerprint"], m["layers"], m["agents"], m["snapshots"]) for m in models] == [(FP, 3, 4, 5)]
    assert FP in run(["models"], home).stdout
    du = run_json(["du"], home)
    expected = oracle_bytes(home)
    assert {r["name"]: {k: v for k, v in r.items() if k not in ("name", "bytes_written")} for r in du} == expected
    assert [r["total_bytes"] for r in du] == sorted((r["total_bytes"] for r in du), reverse=True)
    assert run_json(["du", "biz"], home) == [{"name": "biz", **expected["biz"], "bytes_written": 0}]  # no record
    assert run(["du"], home).stdout.splitlines()[0].split() == ["TOTAL", "UNIQUE", "SHARED", "WRITTEN", "AGENT"]
    assert "written per day (UTC): " in run(["du"], home).stdout


def test_fsck_exit_status_follows_the_problems(home):
    assert "clean" in run(["fsck"], home).stdout
    report = run_json(["fsck"], home)
    assert report["ok"] is True and report["problems"] == []
    with kvstore.open(home) as store:
        assert report["blobs_checked"] == store.stats().blobs
        blob = next(b for b, _ in store.blobs.iter_files())
        path = store.blobs.path(blob)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    out = run(["fsck"], home, code=1).stdout
    assert f"corrupt_blob: {blob}" in out and "kvstore fsck --repair" in out
    bad = json.loads(run(["fsck", "--json"], home, code=1).stdout)
    assert [(p["kind"], p["subject"]) for p in bad["problems"]] == [("corrupt_blob", blob)]
    assert "(repaired)" in run(["fsck", "--repair"], home).stdout
    run(["fsck"], home)


def test_gc_reports_what_it_frees(home):
    with kvstore.open(home) as store:
        files_before = {b: p.stat().st_size for b, p in store.blobs.iter_files()}
    dry = run_json(["gc", "--dry-run"], home)
    assert dry["dry_run"] is True and dry["snapshots_removed"] == 1  # old's first snapshot
    run(["rm", "biz"], home)
    dry = run_json(["gc", "--dry-run", "--grace", "0"], home)
    with kvstore.open(home) as store:
        assert {b for b, _ in store.blobs.iter_files()} == set(files_before)  # a dry run removes nothing
    got = run_json(["gc", "--grace", "0"], home)
    with kvstore.open(home) as store:
        files_after = {b for b, _ in store.blobs.iter_files()}
        assert store.fsck().ok
    gone = set(files_before) - files_after
    assert got["files_removed"] == len(gone) == dry["files_removed"] > 0
    assert got["bytes_freed"] == sum(files_before[b] for b in gone) == dry["bytes_freed"]
    human = run(["gc", "--keep-last", "2"], home).stdout
    assert "freed" in human and "removed blob files" in human


def test_rm_and_fork(home):
    assert "forked tech -> tech-3" in run(["fork", "tech", "tech-3"], home).stdout
    one_line_error(run(["fork", "tech", "biz"], home, code=1), "already exists")
    assert "removed agent tech-3" in run(["rm", "tech-3"], home).stdout
    one_line_error(run(["rm", "tech-3"], home, code=1), "no agent named 'tech-3'")
    assert [r["name"] for r in run_json(["agents"], home)] == ["biz", "old", "tech", "tech-2"]


def test_export_import_through_the_cli_restores_bit_exact(home, tmp_path):
    archive = tmp_path / "tech.tar"
    assert "exported tech" in run(["export", "tech", str(archive)], home).stdout
    one_line_error(run(["export", "tech", str(archive)], home, code=1), "already exists")
    run(["export", "tech", str(archive), "--force"], home)
    target = tmp_path / "elsewhere"  # does not exist yet: import creates it, with the archive's chunk size
    out = run(["import", str(archive)], target).stdout
    assert "imported tech" in out
    with kvstore.open(home) as src, kvstore.open(target) as dst:
        assert dst.chunk_size == C
        a, ta = src.load("tech", model=FP)
        b, tb = dst.load("tech", model=FP)
        assert ta == tb and same_cache(a, b)
        assert dst.agent("tech").meta == {"role": "tech"}
    again = run(["import", str(archive), "--name", "tech-copy"], target).stdout
    assert "0 blobs written" in again
    one_line_error(run(["import", str(archive)], target, code=1), "already exists")


def test_tampered_import_through_the_cli_changes_nothing(home, tmp_path):
    import tarfile

    archive = tmp_path / "biz.tar"
    run(["export", "biz", str(archive)], home)
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("blobs/"))
    with open(archive, "r+b") as f:
        f.seek(member.offset_data + 10)
        f.write(b"\x00\x00\x00\x00")
    target = tmp_path / "t"
    with kvstore.open(target, chunk_size=C) as store:
        t = tokens(C, seed=4)
        store.save("x", make_cache("kv", C, seed=4), t, model=FP)
    before = sorted(p.name for p in target.rglob("*") if p.is_file() and "index.db" not in p.name)
    one_line_error(run(["import", str(archive)], target, code=1), "damaged or was edited")
    after = sorted(p.name for p in target.rglob("*") if p.is_file() and "index.db" not in p.name)
    assert after == before
    assert [r["name"] for r in run_json(["agents"], target)] == ["x"]


def test_bad_input_is_one_line_or_a_usage_error(home, tmp_path):
    one_line_error(run(["show", "nobody"], home, code=1), "no agent named 'nobody'")
    one_line_error(run(["show", "../etc"], home, code=1), "invalid agent name")
    one_line_error(run(["export", "tech", str(tmp_path / "no" / "such" / "dir.tar")], home, code=1))
    junk = tmp_path / "junk.tar"
    junk.write_text("hello")
    one_line_error(run(["import", str(junk)], home, code=1), "not a kvstore archive")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(run(["info"], a_file, code=1), "not a kvstore store")
    one_line_error(run(["--blobs", str(tmp_path), "info"], "nosuchdialect://h/db", code=1), "cannot open")
    assert "Usage:" in run(["--store", "postgresql://h/db", "info"], code=2).stderr  # a URL needs --blobs
    assert run(["show"], home, code=2).exit_code == 2
    assert run(["gc", "--keep-last", "0"], home, code=2).exit_code == 2
    assert run(["gc", "--grace", "-1"], home, code=2).exit_code == 2
    assert run(["nosuchcommand"], home, code=2).exit_code == 2


def test_store_from_env_and_sqlite_url(home):
    env = {"KVSTORE_HOME": str(home)}
    assert json.loads(run(["info", "--json"], env=env).stdout)["agents"] == 4
    url = f"sqlite:///{home / 'index.db'}"
    assert json.loads(run(["--store", url, "agents", "--json"]).stdout)[0]["name"] == "biz"
    assert json.loads(run(["--store", url, "--blobs", str(home), "fsck", "--json"]).stdout)["ok"] is True


def test_migrate(home):
    assert json.loads(run(["migrate", "--status", "--json"], home).stdout) == {
        "store": str(home),
        "exists": True,
        "current": kvstore.index.schema.SCHEMA_REVISION,
        "head": kvstore.index.schema.SCHEMA_REVISION,
        "up_to_date": True,
    }
    assert "up to date" in run(["migrate", "--status"], home).stdout
    assert "nothing to do" in run(["migrate"], home).stdout


def _entry_point() -> list[str]:
    exe = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvstore.cli"]


def test_installed_entry_point(home):
    base = _entry_point() + ["--store", str(home)]
    done = subprocess.run(base + ["agents", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["name"] for r in json.loads(done.stdout)] == ["biz", "old", "tech", "tech-2"]
    # `python -m kvstore.cli` is the same command; an error is one line on stderr and exit status 1.
    bad = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "--store", str(home), "show", "nobody"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "kvstore: error: no agent named 'nobody' in this store\n"
