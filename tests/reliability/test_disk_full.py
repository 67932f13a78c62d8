"""Disk full: ENOSPC at each write point leaves the store consistent, earlier snapshots intact, and
raises kvstore.StoreFullError with a clear message.

Two ways: a real, tiny tmpfs filled to the brim (when this machine lets us mount one), and ENOSPC
injected into one exact call of the blob write path (temp create, write, fsync, rename, directory
fsync) or into SQLite itself (`max_page_count`: the index cannot grow), which runs everywhere.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import types

import pytest
from sqlalchemy import event

import kvstore
import kvstore.blob.local
import kvstore.blob.tensorfile

from . import report, synth
from .damage import check_restores, populate


class _FailingOs(types.SimpleNamespace):
    """`os` for the blob write path with calls of some names failing ENOSPC when `when(*args)` holds."""

    def __init__(self, names: tuple[str, ...], when=lambda *a: True):
        super().__init__()
        self._names, self._when, self.hits = names, when, 0

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr not in self._names:
            return real

        def failing(*args, **kwargs):
            if self._when(*args):
                self.hits += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        return failing


def _is_dir(path, *_):
    return os.path.isdir(path)


POINTS = {
    "temp_create": (("open",), lambda path, *a: not os.path.isdir(path)),
    "write": (("write", "writev"), lambda *a: True),
    "fsync": (("fsync",), lambda *a: True),
    "rename": (("replace",), lambda *a: True),
    "dir_fsync": (("open",), _is_dir),
}


def _big_agent(rng: random.Random) -> list[int]:
    return [rng.randrange(5000) for _ in range(1500)]


def _after_failure(store: kvstore.Store, exp, name: str, tokens: list[int], err: kvstore.StoreFullError) -> None:
    """The error is clear, nothing half-saved shows, earlier snapshots are intact, and a retry works."""
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "disk full" in str(err) and "nothing was committed" in str(err)
    assert name not in {a.name for a in store.agents()}
    assert set(check_restores(store, exp.snapshots(store)).values()) == {"ok"}
    store.gc(grace=0)
    assert store.fsck(grace=0).problems == ()
    assert list(store.blobs.iter_temp()) == []


@pytest.mark.parametrize("point", sorted(POINTS))
def test_enospc_in_the_blob_write_path(tmp_path, monkeypatch, point):
    store = kvstore.open(tmp_path / "store", chunk_size=synth.CHUNK, io_threads=1)
    exp = populate(store, agents=3)
    tokens = synth.agent_tokens(random.Random(3)) + [7] * 20
    fake = _FailingOs(*POINTS[point])
    monkeypatch.setattr(kvstore.blob.local, "os", fake)
    monkeypatch.setattr(kvstore.blob.tensorfile, "os", fake)  # the blob bytes go out through tensorfile.write_all
    with pytest.raises(kvstore.StoreFullError) as info:
        store.save("late", synth.make_cache(tokens), tokens, model=synth.FP)
    monkeypatch.undo()
    assert fake.hits == 1
    _after_failure(store, exp, "late", tokens, info.value)
    store.save("late", synth.make_cache(tokens), tokens, model=synth.FP)  # room again: it saves
    assert set(check_restores(store, {store.agent("late").head: ("late", tokens)}).values()) == {"ok"}
    store.close()
    report.record("disk_full", injected_points=1)


def test_index_that_cannot_grow(tmp_path):
    """SQLITE_FULL from the index itself (its pages capped): StoreFullError, the blobs it wrote become garbage."""
    store = kvstore.open(tmp_path / "store", chunk_size=synth.CHUNK)
    exp = populate(store, agents=3)
    store.engine.dispose()

    @event.listens_for(store.engine, "connect")
    def _cap(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        pages = cur.execute("PRAGMA page_count").fetchone()[0]
        cur.execute(f"PRAGMA max_page_count = {pages}")
        cur.close()

    tokens = _big_agent(random.Random(4))
    with pytest.raises(kvstore.StoreFullError) as info:
        store.save("big", synth.make_cache(tokens), tokens, model=synth.FP)
    _after_failure(store, exp, "big", tokens, info.value)
    store.close()
    report.record("disk_full", injected_points=1)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 3 MB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def _fill(path, chunk: int = 4096) -> None:
    """Write zeros to `path` until the filesystem refuses."""
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * chunk
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.slow
def test_really_full_filesystem(tiny_fs):
    store = kvstore.open(tiny_fs / "store", chunk_size=synth.CHUNK)
    exp = populate(store, agents=3)
    ballast = tiny_fs / "ballast"
    rng = random.Random(9)
    outcomes: dict[str, int] = {}
    # Fill the disk, then free a little more room each time: the failure moves from the blob writes
    # into the index (its WAL has to grow at every commit) and finally the save fits.
    for i in range(40):
        with open(ballast, "ab") as f:
            f.truncate(0)
        _fill(ballast)
        os.truncate(ballast, max(0, ballast.stat().st_size - i * (8 << 10)))
        tokens = synth.PREFIXES[0] + [rng.randrange(5000) for _ in range(40)]
        name = f"late{i}"
        try:
            store.save(name, synth.make_cache(tokens), tokens, model=synth.FP)
            exp.heads[name] = tokens
            outcomes["saved"] = outcomes.get("saved", 0) + 1
        except kvstore.StoreFullError as e:
            assert "disk full" in str(e) and e.errno == errno.ENOSPC
            where = "index" if "saving agent" in str(e) else "blob"
            outcomes[where] = outcomes.get(where, 0) + 1
            assert name not in {a.name for a in store.agents()}
        # Whatever happened, everything committed reads back while the disk is still full.
        assert set(check_restores(store, exp.snapshots(store)).values()) == {"ok"}
        assert sorted(a.name for a in store.agents()) == sorted(exp.heads)
    assert outcomes.get("blob", 0) + outcomes.get("index", 0) > 0
    ballast.unlink()
    store.gc(grace=0)
    assert store.fsck(grace=0).problems == ()
    assert list(store.blobs.iter_temp()) == []
    store.close()
    report.record("disk_full", real_fs_attempts=sum(outcomes.values()), real_fs_outcomes=outcomes)


def test_gc_and_rm_free_space_on_a_full_disk(tiny_fs):
    """Issue 15, item 12: on a full disk gc failed with StoreFullError (its WAL could not grow) while
    --dry-run showed space to reclaim, and rm failed too. The way out must work on a full disk."""
    store = kvstore.open(tiny_fs / "store", chunk_size=synth.CHUNK)
    exp = populate(store, agents=4)
    _fill(tiny_fs / "ballast")
    with pytest.raises(kvstore.StoreFullError):  # the disk really is full: a save cannot commit
        tokens = _big_agent(random.Random(12))
        store.save("late", synth.make_cache(tokens), tokens, model=synth.FP)
    gone = [n for n in sorted(exp.heads) if n != "a0"][:2]
    for name in gone:
        assert store.delete(name)
        del exp.heads[name]
    plan = store.gc(dry_run=True, grace=0)
    assert plan.bytes_freed > 0
    done = store.gc(grace=0)
    assert done.bytes_freed >= plan.bytes_freed and done.blobs_removed == plan.blobs_removed
    assert set(check_restores(store, exp.snapshots(store)).values()) == {"ok"}
    assert sorted(a.name for a in store.agents()) == sorted(exp.heads)
    assert store.fsck(grace=0).problems == ()
    (tiny_fs / "ballast").unlink()
    tokens = synth.agent_tokens(random.Random(13))
    store.save("after", synth.make_cache(tokens), tokens, model=synth.FP)  # and the store works on
    assert store.fsck(grace=0).problems == ()
    store.close()
    report.record("disk_full", full_disk_gc_freed=done.bytes_freed)
