"""The write protocol really fsyncs, renames into shards, re-hashes existing files and commits last."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
import xxhash

import kvstore
from kvstore.blob import local as blobs_mod
from kvstore.blob import tensorfile
from kvstore.testing import make_cache, tokens

FP = "12" * 16


def test_save_fsyncs_every_blob_and_each_shard_directory(tmp_path, monkeypatch):
    synced = []
    real = blobs_mod.fsync_file

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(blobs_mod, "fsync_file", spy)
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        # Creating the store made its folders durable: the store root's entries and blobs/'s shards.
        assert {str(tmp_path / "s"), str(store.blobs.blob_dir)} <= set(synced)
        synced.clear()
        snap = store.save("a", make_cache("kv", 40, mx.float16), tokens(40), model=FP)
        files = [p for _, p in store.blobs.iter_files()]
        temp_synced = [p for p in synced if p.startswith(str(store.blobs.tmp_dir))]
        dir_synced = {p for p in synced if os.path.isdir(p)}
        assert snap.blobs_written == len(files) == 3  # 40 tokens in chunks of 16: 3 chunk blobs
        assert len(temp_synced) == 3  # each blob's temp file, before its rename
        # Each shard folder a blob was renamed into; blobs/ itself was synced when open() made all
        # 256 shard folders, so a save creates no folder and needs no sync of blobs/.
        assert dir_synced == {str(p.parent) for p in files}
        assert sorted(p.name for p in store.blobs.blob_dir.iterdir()) == [f"{i:02x}" for i in range(256)]
        assert list(store.blobs.iter_temp()) == []


def test_non_durable_store_skips_fsync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(blobs_mod, "fsync_file", lambda fd: calls.append(fd))
    with kvstore.open(tmp_path / "s", chunk_size=16, durable=False) as store:
        store.save("a", make_cache("kv", 20, mx.float16), tokens(20), model=FP)
    assert calls == []


def test_existing_damaged_file_is_rehashed_and_replaced(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        blob_id, _, written = store.blobs.put([b"hello ", b"world"])
        assert written
        path = store.blobs.path(blob_id)
        assert path.parent.name == blob_id[:2] and path.name == blob_id[2:] + ".safetensors"
        path.write_bytes(b"hello w0rld")
        again_id, _, rewritten = store.blobs.put([b"hello world"])
        assert again_id == blob_id and rewritten
        assert path.read_bytes() == b"hello world"
        assert store.blobs.put([b"hello world"])[2] is False


def test_blob_files_are_valid_safetensors(tmp_path):
    from safetensors.numpy import load_file

    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("a", make_cache("kv", 16, mx.float32, layers=1), tokens(16), model=FP)
        ((blob_id, path),) = list(store.blobs.iter_files())
        arrays = load_file(str(path))
        assert sorted(arrays) == ["0.k", "0.v"] and arrays["0.k"].shape == (1, 2, 16, 8)


@pytest.mark.parametrize("layers", [1, 40])
def test_large_blobs_start_their_data_on_a_page(tmp_path, layers):
    """40 layers of 16 positions hold 1.25 MiB: their data section is page-aligned (restores place arrays
    congruent with it); one layer's 64 KiB is padded only to 8 bytes, as safetensors does."""
    from safetensors.numpy import load_file

    cache = make_cache("kv", 16, mx.float32, layers=layers)
    for c in cache:  # 2 heads x 16 positions x 256 dims x 4 bytes = 32 KiB per array
        c.keys = mx.random.normal((1, 2, 16, 256))
        c.values = mx.random.normal((1, 2, 16, 256))
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("a", cache, tokens(16), model=FP)
        ((blob_id, path),) = list(store.blobs.iter_files())
        raw = path.read_bytes()
        base, header, _meta = tensorfile.parse_header(raw)
        data = max(end for _b, end in (info["data_offsets"] for info in header.values()))
        assert data == layers * 2 * (32 << 10)
        padding = base - 8 - len(raw[8:base].rstrip(b" "))
        if data >= tensorfile.PAGE_ALIGN_FROM:
            assert base % tensorfile.PAGE == 0 and padding < tensorfile.PAGE
        else:
            assert base % 8 == 0 and padding < 8
        arrays = load_file(str(path))  # the padding is safetensors' own: other readers take it
        assert np.array_equal(arrays["0.k"], np.array(cache[0].keys))
        loaded, _ = store.load("a", model=FP)
        assert all(bool(mx.array_equal(a.keys, b.keys).item()) for a, b in zip(cache, loaded))


def test_a_failed_blob_write_commits_nothing(tmp_path, monkeypatch):
    with kvstore.open(tmp_path / "s", chunk_size=16) as store:
        store.save("a", make_cache("kv", 16, mx.float16), tokens(16), model=FP)

        def full(*_a, **_k):
            raise OSError(28, "No space left on device")

        from kvstore.blob import tensorfile

        monkeypatch.setattr(tensorfile.os, "write", full)
        monkeypatch.setattr(tensorfile.os, "writev", full)
        with pytest.raises(kvstore.StoreFullError, match="disk full"):
            store.save("a", make_cache("kv", 40, mx.float16, seed=3), tokens(40, seed=3), model=FP)
        monkeypatch.undo()
        assert [s.n_tokens for s in store.snapshots("a")] == [16]
        assert list(store.blobs.iter_temp()) == []
        assert store.fsck().ok


class _WritevSpy:
    """The real os module, with writev recording each call's bytes and, if asked, writing only part."""

    def __init__(self, short: bool):
        self.short, self.calls = short, []

    def __getattr__(self, name):
        return getattr(os, name)

    def writev(self, fd, buffers):
        size = sum(len(b) for b in buffers)
        self.calls.append(size)
        if not self.short or size < 2:
            return os.writev(fd, buffers)
        return os.write(fd, b"".join(bytes(b) for b in buffers)[: size // 2 + 1])  # a real short write


@pytest.mark.parametrize("short", [False, True])
def test_write_all_writes_every_byte_in_bounded_calls(tmp_path, monkeypatch, short):
    from kvstore.blob import tensorfile

    rng = np.random.default_rng(5)
    buffers = [b"", rng.bytes(1), rng.bytes(3 * tensorfile.WRITE_BYTES + 17)] + [rng.bytes(10_000) for _ in range(300)]
    spy = _WritevSpy(short)
    monkeypatch.setattr(tensorfile, "os", spy)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    hasher = xxhash.xxh3_128()
    try:
        tensorfile.write_all(fd, [memoryview(b) for b in buffers], hasher)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(buffers)
    assert max(spy.calls) <= tensorfile.WRITE_BYTES and len(spy.calls) >= 6
    # Hashed as written, short writes included: every byte once, in file order.
    assert hasher.hexdigest() == xxhash.xxh3_128_hexdigest(b"".join(buffers))


def test_a_blob_put_without_its_id_is_named_by_the_hash_of_what_was_copied(tmp_path):
    """put() hashes the bytes as it copies them; the name, the copied callback and a dedup hit agree."""
    with kvstore.open(tmp_path / "s") as store:
        parts = [b"header", np.arange(300_000, dtype=np.uint32).tobytes(), b"tail"]
        told = []
        blob_id, nbytes, written = store.blobs.put([memoryview(p) for p in parts], None, copied=told.append)
        assert written and told == [blob_id] == [xxhash.xxh3_128_hexdigest(b"".join(parts))]
        assert nbytes == sum(map(len, parts)) and store.blobs.path(blob_id).read_bytes() == b"".join(parts)
        # The same bytes again: copied to a temp file, found stored, dropped; nothing reported copied.
        again = store.blobs.put(parts, None, copied=told.append)
        assert again == (blob_id, nbytes, False) and told == [blob_id]
        assert list(store.blobs.iter_temp()) == []
