"""The write protocol's order, step by step: what a save fsyncs and renames, and when it commits.

A kill test sees only the end state after a crash at a few points; these record every os.fsync and
os.replace a save makes (the real calls still run) and the commit of its write transaction, and check the
order the protocol promises (docs/ARCHITECTURE.md, "write protocol"):

- a new blob: temp file written whole -> fsync it -> rename into its shard -> fsync the shard folder -> commit;
- a blob another process has just written (a dedup hit): its shard folder is fsynced before the commit, since
  that process may have renamed the file there without having synced the folder yet (or died first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from sqlalchemy import event

import kvstore
from kvstore.testing import make_cache, tokens

FP = "34" * 16
CHUNK = 16


@pytest.fixture
def recorder(monkeypatch):
    """A list of ("fsync", path, size) and ("replace", src, dst) as they happen, in this process."""
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), st.st_size))
        real_fsync(fd)

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        log.append(("replace", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def record_commits(store, log: list[tuple]) -> None:
    """Append ("commit",) to `log` when a write transaction of the store's index commits."""

    def on_commit(conn):
        if conn.get_execution_options().get("kvstore_write"):
            log.append(("commit",))

    event.listen(store.engine, "commit", on_commit)


def _cache():
    return make_cache("kv", 3 * CHUNK, mx.float16), tokens(3 * CHUNK)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fsynced paths from /proc/self/fd")
def test_new_blob_is_written_synced_renamed_and_its_folder_synced_before_the_commit(tmp_path, recorder):
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        record_commits(store, recorder)
        recorder.clear()
        cache, toks = _cache()
        snap = store.save("a", cache, toks, model=FP)
        files = {b: Path(p) for b, p in store.blobs.iter_files()}
    assert snap.blobs_written == len(files) == 3
    commits = [i for i, e in enumerate(recorder) if e == ("commit",)]
    assert len(commits) == 1  # the save's one write transaction
    commit = commits[0]
    for path in files.values():
        (rename,) = [i for i, e in enumerate(recorder) if e[0] == "replace" and e[2] == str(path)]
        temp = recorder[rename][1]
        assert Path(temp).parent == tmp_path / "s" / "tmp"
        # the temp file fsynced after its last byte was written (its size then is the blob's) and before the rename
        temp_syncs = [i for i, e in enumerate(recorder) if e[0] == "fsync" and e[1] == temp]
        assert len(temp_syncs) == 1 and temp_syncs[0] < rename
        assert recorder[temp_syncs[0]][2] == path.stat().st_size
        # the shard folder fsynced after the rename, and the commit after that
        folder_syncs = [i for i, e in enumerate(recorder) if e[0] == "fsync" and e[1] == str(path.parent)]
        assert any(rename < i < commit for i in folder_syncs), recorder
    assert max(i for i, e in enumerate(recorder) if e[0] != "commit") < commit  # nothing durable left after


def _put_in_another_process(root: Path, blob_files: list[Path]) -> None:
    """Another process stores these blob files' bytes in the store at `root`, as a racing save's put does."""
    code = (
        "import sys; from pathlib import Path; from kvstore.blob.local import BlobStore\n"
        "blobs = BlobStore(Path(sys.argv[1]))\n"
        "for f in sys.argv[2:]: print(blobs.put([Path(f).read_bytes()])[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root), *map(str, blob_files)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fsynced paths from /proc/self/fd")
def test_save_reusing_a_blob_another_process_just_wrote_syncs_its_folder_before_the_commit(tmp_path, recorder):
    cache, toks = _cache()
    # The blobs this save makes, from a scratch store: content-addressed, so the same bytes and ids.
    with kvstore.open(tmp_path / "scratch", chunk_size=CHUNK, durable=False) as scratch:
        scratch.save("a", cache, toks, model=FP)
        made = {b: Path(p) for b, p in scratch.blobs.iter_files()}
    with kvstore.open(tmp_path / "s", chunk_size=CHUNK) as store:
        # Another process writes them into this store (it renamed them; whether it synced their folders
        # is its business: it may die right after the rename).
        _put_in_another_process(tmp_path / "s", list(made.values()))
        assert {b for b, _ in store.blobs.iter_files()} == set(made)
        record_commits(store, recorder)
        recorder.clear()
        snap = store.save("a", cache, toks, model=FP)
        assert snap.blobs_written == 0 and snap.blobs_reused == len(made) == 3
        shards = {str(store.blobs.path(b).parent) for b in made}
    assert not [e for e in recorder if e[0] == "replace"]  # nothing written again
    commits = [i for i, e in enumerate(recorder) if e == ("commit",)]
    assert len(commits) == 1
    for shard in shards:
        syncs = [i for i, e in enumerate(recorder) if e[0] == "fsync" and e[1] == shard]
        assert any(i < commits[0] for i in syncs), f"shard folder {shard} not fsynced before the commit: {recorder}"
