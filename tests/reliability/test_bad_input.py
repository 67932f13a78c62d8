"""Bad input: hostile names, a wrong model, a schema newer than the code, a folder that is not a store,
a read-only store, and arguments of the wrong type. Each gives a clear error and changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import text

import kvstore

from . import report, synth

HOSTILE = [
    "",
    ".",
    "..",
    "/",
    "a/b",
    "../etc/passwd",
    "a\\b",
    "a\0b",
    "\0",
    "x" * 10_000,
    "x" * 201,
    "-rf",
    "--all",
    ".hidden",
    " lead",
    "trail ",
    "a\nb",
    "tab\t",
    "a..b",
    "\u202egnp.exe",
    "ａｄｍｉｎ",
    "e\u0301",
    "Ω",
    "\ufeffbom",
    "a\u200bb",
    "~",
    "$HOME",
    "*",
    "a;rm -rf /",
    "C:\\x",
    "%s%n",
]
NOT_STRINGS = [None, 5, 1.5, b"bytes", ["a"], {"a": 1}, True]


@pytest.fixture
def store(tmp_path):
    s = kvstore.open(tmp_path / "store", chunk_size=synth.CHUNK)
    tokens = synth.PREFIXES[0]
    s.save("good", synth.make_cache(tokens), tokens, model=synth.FP, meta={"role": "r"})
    yield s
    s.close()


def _unchanged(store) -> None:
    assert [a.name for a in store.agents()] == ["good"]
    cache, tokens = store.load("good", model=synth.FP)
    assert tokens == synth.PREFIXES[0] and synth.checksum(cache) == synth.expected_sum(tokens)
    assert store.fsck(grace=0).problems == ()


@pytest.mark.parametrize("name", HOSTILE + NOT_STRINGS, ids=repr)
def test_hostile_names_are_refused_everywhere(store, name):
    tokens = synth.PREFIXES[1]
    calls = [
        lambda: store.save(name, synth.make_cache(tokens), tokens, model=synth.FP),
        lambda: store.load(name, model=synth.FP),
        lambda: store.delete(name),
        lambda: store.agent(name),
        lambda: store.fork("good", name),
        lambda: store.fork(name, "other"),
        lambda: store.snapshots(name),
        lambda: store.set_meta(name, {}),
    ]
    if name is not None:  # label=None means "no label"
        calls.append(lambda: store.save("good2", synth.make_cache(tokens), tokens, model=synth.FP, label=name))
    for call in calls:
        with pytest.raises(kvstore.InvalidNameError):
            call()
    _unchanged(store)
    assert list(store.blobs.iter_temp()) == []
    report.record("bad_input", hostile_names=1)


def test_wrong_model_loads_nothing(store):
    tokens = synth.PREFIXES[0]
    with pytest.raises(kvstore.ModelMismatchError):
        store.load("good", model=synth.OTHER_FP)
    assert store.restore(tokens, model=synth.OTHER_FP) == (None, 0)  # another model's cache is never offered
    assert store.match(tokens, model=synth.OTHER_FP).n_tokens == 0
    with pytest.raises(kvstore.ModelMismatchError):  # the agent belongs to another model
        store.save("good", synth.make_cache(tokens), tokens, model=synth.OTHER_FP)
    # A cache whose layers are not the model's (here: one layer short) under the model's fingerprint.
    with pytest.raises(kvstore.ModelMismatchError):
        store.save("other", synth.make_cache(tokens, kinds=("kv", "kv", "rot")), tokens, model=synth.FP)
    _unchanged(store)


def test_schema_newer_than_the_code(store):
    path = store.path
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    store.close()
    with pytest.raises(kvstore.SchemaTooNewError) as info:
        kvstore.open(path)
    assert "9999_from_the_future" in str(info.value) and kvstore.index.schema.SCHEMA_REVISION in str(info.value)
    assert "upgrade kvstore" in str(info.value)


def test_what_is_not_a_store(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("hello")
    with pytest.raises(kvstore.NotAStoreError):
        kvstore.open(afile)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(kvstore.NotAStoreError):
        kvstore.open(other)
    assert sorted(os.listdir(other)) == ["cat.jpg"]  # nothing was created in somebody's folder
    with pytest.raises(kvstore.NotAStoreError):
        kvstore.open(tmp_path / "missing", create=False)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "index.db").write_text("this is not a database, just a text file of some length " * 20)
    with pytest.raises(kvstore.IndexDatabaseError):
        kvstore.open(fake)


def _check_read_only(ro: kvstore.Store) -> None:
    tokens = synth.PREFIXES[0]
    cache, got = ro.load("good", model=synth.FP)
    assert got == tokens and synth.checksum(cache) == synth.expected_sum(tokens)
    cache, n = ro.restore(tokens, model=synth.FP)
    assert n == len(tokens) and synth.checksum(cache) == synth.expected_sum(tokens)
    assert ro.fsck().ok and [a.name for a in ro.agents()] == ["good"]
    for write in (
        lambda: ro.save("new", synth.make_cache(tokens), tokens, model=synth.FP),
        lambda: ro.save("good", synth.make_cache(tokens), tokens, model=synth.FP),
        lambda: ro.delete("good"),
        lambda: ro.fork("good", "copy"),
        lambda: ro.set_meta("good", {}),
        lambda: ro.gc(),
        lambda: ro.fsck(repair=True),
        lambda: ro.discard_blob("0" * 32),
    ):
        with pytest.raises(kvstore.ReadOnlyStoreError, match="read-only"):
            write()
    with tempfile.TemporaryDirectory() as tmp:  # an export is a read; an import is a write
        kvstore.export_agent(ro, "good", Path(tmp) / "good.tar")
        with pytest.raises(kvstore.ReadOnlyStoreError, match="read-only"):
            kvstore.import_agent(ro, Path(tmp) / "good.tar", name="copy")


def test_readonly_open_mode(store):
    path = store.path
    store.close()
    with kvstore.open(path, readonly=True) as ro:
        _check_read_only(ro)
    with kvstore.open(path) as rw:
        _unchanged(rw)


@pytest.mark.slow
def test_read_only_mount(store, tmp_path):
    """A real read-only filesystem (bind mount, remounted ro): as root, permission bits would not stop writes."""
    src = store.path
    store.close()
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "--bind", str(src), str(ro_dir)], capture_output=True).returncode != 0
    ):
        pytest.skip("cannot bind-mount here")
    try:
        assert subprocess.run(["mount", "-o", "remount,ro,bind", str(ro_dir)]).returncode == 0
        with kvstore.open(ro_dir) as ro:  # found read-only by itself
            assert ro.readonly
            _check_read_only(ro)
        with pytest.raises(kvstore.ReadOnlyStoreError, match="readonly=True"):
            kvstore.open(ro_dir, readonly=False)
    finally:
        if subprocess.run(["umount", str(ro_dir)]).returncode != 0:
            subprocess.run(["umount", "-l", str(ro_dir)])
    with kvstore.open(src) as rw:
        _unchanged(rw)


def test_arguments_of_the_wrong_type(store):
    tokens = synth.PREFIXES[1]
    cache = synth.make_cache(tokens)
    wrong = [
        (lambda: store.save("b", cache, "some text", model=synth.FP), TypeError, "tokens must be"),
        (lambda: store.save("b", cache, None, model=synth.FP), TypeError, "tokens must be"),
        (
            lambda: store.save("b", cache, [t + 0.5 for t in tokens], model=synth.FP),
            TypeError,
            "token ids must be integers",
        ),
        (lambda: store.save("b", cache, [tokens, tokens], model=synth.FP), ValueError, "one sequence"),
        (lambda: store.save("b", cache, [-1] * len(tokens), model=synth.FP), ValueError, "fit in uint32"),
        (lambda: store.save("b", cache, tokens[:-1], model=synth.FP), kvstore.StoreError, "has seen 23 tokens but 22"),
        (lambda: store.save("b", {"k": cache}, tokens, model=synth.FP), TypeError, "cache must be a list"),
        (lambda: store.save("b", None, tokens, model=synth.FP), TypeError, "cache must be a list"),
        (
            lambda: store.save("b", ["not a cache"], tokens, model=synth.FP),
            kvstore.UnsupportedCacheError,
            "cannot store a builtins.str",
        ),
        (lambda: store.save("b", cache, tokens, model=None), TypeError, "model= must be"),
        (lambda: store.save("b", cache, tokens, model=42), TypeError, "model= must be"),
        (
            lambda: store.save("b", cache, tokens, model=synth.FP, meta=["not", "a", "dict"]),
            TypeError,
            "meta must be a dict",
        ),
        (lambda: store.set_meta("good", "not a dict"), TypeError, "meta must be a dict"),
        (lambda: store.restore("some text", model=synth.FP), TypeError, "tokens must be"),
        (lambda: store.match([0.5], model=synth.FP), TypeError, "token ids must be integers"),
        (lambda: store.gc(keep_last=0), ValueError, "keep_last"),
        (lambda: store.gc(grace="soon"), TypeError, "grace must be a number"),
        (lambda: store.gc(grace=-1), ValueError, "grace must be >= 0"),
        (lambda: store.fsck(grace="soon"), TypeError, "grace must be a number"),
        (lambda: kvstore.open(store.path, chunk_size="16"), (ValueError, kvstore.StoreError), "chunk_size must be"),
        (lambda: kvstore.open(42), TypeError, "os.PathLike"),
    ]
    for call, error, says in wrong:
        with pytest.raises(error) as info:
            call()
        assert says in str(info.value)  # a message that names what was wrong
    _unchanged(store)
    report.record("bad_input", wrong_type_calls=len(wrong))
