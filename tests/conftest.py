"""Shared fixtures: real stores on disk (SQLite, and PostgreSQL when KVSTORE_TEST_PG_URL is set)."""

from __future__ import annotations

import os
import uuid

import pytest

import kvstore

TEST_CHUNK = 16  # small chunks so short test caches span several of them
PG_URL = os.environ.get("KVSTORE_TEST_PG_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def _fresh_pg_database() -> str:
    """A new, empty PostgreSQL database for one test; returns its URL."""
    from sqlalchemy import create_engine, text

    name = "kvt_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + "/" + name


def make_store(tmp_path, backend: str = "sqlite", **kwargs) -> kvstore.Store:
    """A store under tmp_path on the given backend (blobs always on local disk)."""
    kwargs.setdefault("chunk_size", TEST_CHUNK)
    if backend == "postgresql":
        url = kwargs.pop("url", None) or _fresh_pg_database()
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
    if backend == "postgresql":
        return _fresh_pg_database(), {"blobs": str(tmp_path / "blobs-root"), "chunk_size": TEST_CHUNK}
    return str(tmp_path / "store"), {"chunk_size": TEST_CHUNK}


def pytest_addoption(parser):
    """`--long`: the reliability suite's crash harness runs 2,000 kills instead of 200."""
    parser.addoption("--long", action="store_true", default=False,
                     help="reliability suite: 2,000 crash-injection kills instead of 200")
