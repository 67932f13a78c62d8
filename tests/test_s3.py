"""What only a store with its blobs on S3 does: processes sharing one bucket and one index, gc beside
saves, the server gone mid-save, objects changed behind the store's back, credentials, the disk tier.

The engine's core modules also run on S3 through the `store` fixture (conftest.S3_MODULES). These
need KVSTORE_TEST_S3_URL and the AWS_* keys of that server (`.ci/run` starts SeaweedFS on loopback);
the index is on PostgreSQL when KVSTORE_TEST_PG_URL is set, else a SQLite file.

Run as a script, this file is the child process of the multi-process tests (`python test_s3.py ROLE ...`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvstore
from kvstore.errors import BlobServiceError, CorruptBlobError, NoSuchBucketError, StoreAccessDeniedError

TESTS_DIR = Path(__file__).resolve().parent
S3_URL = os.environ.get("KVSTORE_TEST_S3_URL")
pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not S3_URL, reason="needs an S3 server: set KVSTORE_TEST_S3_URL (.ci/run does)"),
]


def _args(tmp_path, tier: str = "tier") -> tuple[str, dict]:
    from conftest import s3_store_args
    from reliability import synth

    index, kw = s3_store_args(tmp_path)
    return index, {**kw, "cache_dir": str(tmp_path / tier), "chunk_size": synth.CHUNK}


def _open(index: str, **kw) -> kvstore.Store:
    return kvstore.open(index, **kw)


def _child(role: str, *args: str) -> subprocess.Popen:
    """This file run as a child process in `role` (see main)."""
    from conftest import spawn_test_file

    return spawn_test_file(__file__, role, *args)


def _wait(p: subprocess.Popen, timeout: float = 600) -> None:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{out}\n{err}"


def _object_store():
    """A plain obstore client on the test bucket: the hand that changes objects behind the store's back."""
    from obstore.store import S3Store

    from kvstore.blob.s3 import parse_url

    loc = parse_url(S3_URL)
    return S3Store(
        loc.bucket, config={"endpoint": loc.endpoint, "region": "us-east-1"}, client_options={"allow_http": True}
    )


def _save_some(store, names=("a", "b"), n=70):
    from reliability import synth

    out = {}
    for i, name in enumerate(names):
        toks = synth.PREFIXES[0] + [5000 + i * 100 + j for j in range(n - len(synth.PREFIXES[0]))]
        store.save(name, synth.make_cache(toks), toks, model=synth.FP)
        out[name] = toks
    return out


def _check(store, name, toks):
    from reliability import synth

    cache, got = store.load(name, model=synth.FP)
    assert got == toks
    assert synth.checksum(cache) == synth.expected_sum(toks)


# -- processes sharing one bucket and one index --------------------------------------------------------------


def test_two_processes_share_one_bucket_and_index_while_a_third_collects(tmp_path):
    """Two savers (shared prefixes, concurrent) and a looping gc(grace=0), each a process with its own disk
    tier: every save each saver committed loads bit-exact afterwards, from a fresh tier too, and fsck is clean."""
    index, kw = _args(tmp_path)
    kvstore.open(index, **kw).close()  # create the index before the processes race to
    spec = json.dumps({"index": index, **kw})
    stop = tmp_path / "stop"
    savers = [
        _child("saver", spec, str(tmp_path / f"tier{w}"), str(w), "12", str(tmp_path / f"out{w}")) for w in range(2)
    ]
    gc = _child("gc", spec, str(tmp_path / "tier-gc"), str(stop), str(tmp_path / "out-gc"))
    try:
        for p in savers:
            _wait(p)
    finally:
        stop.touch()
        _wait(gc)
    assert json.loads((tmp_path / "out-gc").read_text())["passes"] >= 1
    with _open(index, **{**kw, "cache_dir": str(tmp_path / "tier-fresh")}) as store:
        for w in range(2):
            for name, toks in json.loads((tmp_path / f"out{w}").read_text())["agents"].items():
                _check(store, name, toks)
        report = store.fsck(grace=0)
        assert report.problems == ()


# -- the server stopped mid-save -----------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path):
    """A SeaweedFS of this test's own (it gets stopped), with the CI server's keys."""
    sys.path.insert(0, str(TESTS_DIR.parent / ".ci"))
    try:
        from seaweedfs import SeaweedFS
    finally:
        sys.path.pop(0)
    server = SeaweedFS(tmp_path / "weed")
    server.start()
    yield server
    server.stop()


def _wait_for_volumes(store, timeout: float = 120.0) -> None:
    """A restarted SeaweedFS serves S3 before its volume server has registered the old volumes (GETs of
    objects written before answer 500 for a while): wait until one of them reads back."""
    some = next(b for b, _ in store.blobs.iter_files())
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.blobs.read(some)
            return
        except BlobServiceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_server_stopped_mid_save_fails_cleanly_and_commits_nothing(tmp_path, own_server):
    from reliability import synth

    url = own_server.url("mid") + "&retries=1&retry_timeout=2"
    index = str(tmp_path / "store")
    kw = {"cache_dir": str(tmp_path / "tier"), "chunk_size": synth.CHUNK}
    with kvstore.open(index, blobs=url, **kw) as store:
        before = _save_some(store, ["first"])
        puts = []
        real_put = store.blobs.put

        def put_then_stop(*a, **k):  # the real server really dies, after the second blob of the next save
            got = real_put(*a, **k)
            puts.append(got[0])
            if len(puts) == 2:
                own_server.stop()
            return got

        store.blobs.put = put_then_stop
        toks = [7000 + i for i in range(90)]
        with pytest.raises(BlobServiceError):
            store.save("second", synth.make_cache(toks), toks, model=synth.FP)
        assert len(puts) >= 2
        assert [a.name for a in store.agents()] == ["first"]
        # The committed agent still loads from the disk tier with the server down: no request is needed.
        _check(store, "first", before["first"])
    own_server.start()  # the same data on new ports
    url = own_server.url("mid")
    with kvstore.open(index, blobs=url, **{**kw, "cache_dir": str(tmp_path / "tier2")}) as store:
        _wait_for_volumes(store)
        _check(store, "first", before["first"])
        report = store.fsck(grace=0)
        # The blobs the failed save did put are orphans (no row names them), never missing references.
        assert {p.kind for p in report.problems} <= {"orphan_file"}
        assert len(report.problems) <= len(puts)
        store.gc(grace=0)
        assert store.fsck(grace=0).problems == ()


# -- objects changed behind the store's back -------------------------------------------------------------------


def test_deleted_and_altered_objects_are_found_by_fsck_and_refused_by_restore(tmp_path):
    import obstore as obs
    from reliability import synth

    index, kw = _args(tmp_path)
    with _open(index, **kw) as store:
        saved = _save_some(store, ["a"], n=40)
        ids = sorted(b for b, _ in store.blobs.iter_files())
        gone, changed = ids[0], ids[1]
        raw = _object_store()
        obs.delete(raw, store.blobs.key(gone))
        body = bytearray(bytes(obs.get(raw, store.blobs.key(changed)).bytes()))
        body[-1] ^= 0xFF
        obs.put(raw, store.blobs.key(changed), bytes(body))
        report = store.fsck()
        assert {(p.kind, p.subject) for p in report.problems} == {("missing_blob", gone), ("corrupt_blob", changed)}
    # A fresh tier: the bucket's copies are what a restore sees, and it refuses them.
    with _open(index, **{**kw, "cache_dir": str(tmp_path / "tier-b")}) as store:
        with pytest.raises((CorruptBlobError, kvstore.errors.MissingBlobError)) as e:
            store.load("a", model=synth.FP)
        assert e.value.blob_id in (gone, changed)
        with pytest.raises((CorruptBlobError, kvstore.errors.MissingBlobError)):
            store.restore(saved["a"], model=synth.FP)
        with pytest.raises(CorruptBlobError):
            store.blobs.read(changed)
        report = store.fsck(repair=True)
        assert {p.kind for p in report.problems} == {"missing_blob", "corrupt_blob", "prefix_shortened"}
        assert store.fsck().problems == ()
        cache, n = store.restore(saved["a"], model=synth.FP)  # the prefix still whole, not an error
        assert n < len(saved["a"]) and (n == 0 or synth.checksum(cache) == synth.expected_sum(saved["a"][:n]))


def test_a_damaged_tier_file_is_dropped_and_fetched_again(tmp_path):

    index, kw = _args(tmp_path)
    with _open(index, **kw) as store:
        saved = _save_some(store, ["a"], n=40)
        ids = [b for b, _ in store.blobs.iter_files()]
        for b in ids:  # the save wrote them through to the tier
            assert store.blobs.tier.path(b).exists()
        victim = store.blobs.tier.path(ids[0])
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        from kvstore.blob import scatter

        scatter._VERIFIED.clear()  # as in a new process: nothing about the blob is known yet
        _check(store, "a", saved["a"])
        assert store.blobs.tier.path(ids[0]).read_bytes() != bytes(data)  # replaced by the bucket's copy


def test_large_blobs_are_fetched_as_ranged_gets_and_restore_bit_exact(tmp_path, monkeypatch):
    """Blobs larger than a part come back as several ranged GETs, assembled, verified and restored exactly."""
    from reliability import synth

    from kvstore.blob import s3, scatter

    monkeypatch.setattr(s3, "PART", 4000)  # every test blob spans several parts (and one ends mid-part)
    index, kw = _args(tmp_path)
    with _open(index, **kw) as store:
        saved = _save_some(store, ["a", "b"], n=70)
        sizes = [store.blobs.size(e) for _b, e in store.blobs.iter_files()]
        assert max(sizes) > 3 * s3.PART and any(n % s3.PART for n in sizes)
    with _open(index, **{**kw, "cache_dir": str(tmp_path / "tier-empty")}) as store:
        scatter._VERIFIED.clear()
        for name, toks in saved.items():
            _check(store, name, toks)
        assert store.restore(saved["a"][:50], model=synth.FP)[1] == 48  # whole chunks of the shared prefix


def test_the_disk_tier_stays_within_its_budget_evicting_least_recently_used(tmp_path):
    from kvstore.blob.tier import DiskTier

    tier = DiskTier(tmp_path / "t", max_bytes=10_000)
    blobs = {f"{i:02x}" + "0" * 30: bytes([i]) * 3000 for i in range(6)}
    for i, (b, data) in enumerate(blobs.items()):
        tier.add(b, [data])
        os.utime(tier.path(b), (1_000_000 + i, 1_000_000 + i))  # a clear order of use
        if i == 2:
            assert tier.has(next(iter(blobs)))  # the first one is used again: now the most recent
            os.utime(tier.path(next(iter(blobs))), (2_000_000, 2_000_000))
    kept = {b for b in blobs if tier.path(b).exists()}
    assert sum(len(blobs[b]) for b in kept) <= 10_000
    assert next(iter(blobs)) in kept  # recently used survives older ones
    assert list(blobs)[-1] in kept  # the newest one is never evicted by its own add


# -- credentials, buckets, URLs ----------------------------------------------------------------------------------


def test_wrong_credentials_and_a_missing_bucket_are_clear_errors(tmp_path, monkeypatch):
    from conftest import s3_url

    index = str(tmp_path / "store")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreAccessDeniedError, match="credentials"):
        kvstore.open(index, blobs=s3_url("x") + "&retries=0", cache_dir=tmp_path / "t")
    monkeypatch.undo()
    bucket = S3_URL.removeprefix("s3://").split("?")[0].split("/")[0]
    missing = S3_URL.replace(f"s3://{bucket}", "s3://no-such-bucket-kvstore", 1) + "&retries=0"
    with pytest.raises(NoSuchBucketError, match="does not exist"):
        kvstore.open(index, blobs=missing, cache_dir=tmp_path / "t")
    with pytest.raises(kvstore.errors.StoreError, match="unknown option"):
        kvstore.open(index, blobs=s3_url("x") + "&colour=blue", cache_dir=tmp_path / "t")


def test_profiles_from_the_aws_files(tmp_path, monkeypatch):
    from conftest import s3_url
    from reliability import synth

    (tmp_path / "credentials").write_text(
        f"[team]\naws_access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with kvstore.open(
        tmp_path / "store", blobs=s3_url("profile") + "&profile=team", cache_dir=tmp_path / "t", chunk_size=synth.CHUNK
    ) as store:
        _check(store, *next(iter(_save_some(store, ["p"]).items())))
    with pytest.raises(StoreAccessDeniedError, match="nobody"):
        kvstore.open(tmp_path / "store", blobs=s3_url("profile") + "&profile=nobody", cache_dir=tmp_path / "t")


# -- S3 semantics -------------------------------------------------------------------------------------------------


def test_puts_are_conditional_and_gc_deletes_in_batches(tmp_path):

    index, kw = _args(tmp_path)
    with _open(index, **kw) as store:
        _save_some(store, ["a"], n=40)
        ids = sorted(b for b, _ in store.blobs.iter_files())
        data = bytes(store.blobs.read(ids[0]))
        assert store.blobs.put([data], ids[0]) == (ids[0], len(data), False)  # If-None-Match: * said it exists
        assert store.blobs.read_range(ids[0], 8, 16) == data[8:16]
        with pytest.raises(CorruptBlobError):
            store.blobs.put([data + b"x"], ids[0])  # bytes that are not the id's are never stored
        store.delete("a")
        report = store.gc(grace=0)
        assert report.files_removed == len(ids)
        assert list(store.blobs.iter_files()) == []
        assert store.fsck(grace=0).problems == ()


def main(argv: list[str]) -> int:
    """Roles: `saver SPEC TIER WORKER SAVES OUT`, `gc SPEC TIER STOP OUT`."""
    import traceback

    from reliability import stress

    role, spec, tier = argv[0], json.loads(argv[1]), argv[2]
    index = spec.pop("index")
    try:
        with kvstore.open(index, **{**spec, "cache_dir": tier}) as store:
            if role == "saver":
                worker, saves, out = int(argv[3]), int(argv[4]), Path(argv[5])
                out.write_text(json.dumps(stress.saver(store, worker, saves, 100 + worker)))
            elif role == "gc":
                stop, out = Path(argv[3]), Path(argv[4])
                out.write_text(json.dumps({"passes": stress.collector(store, stop.exists)}))
            else:
                raise SystemExit(f"unknown role {role!r}")
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
