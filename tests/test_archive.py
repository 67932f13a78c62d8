"""export -> import moves an agent bit-exactly; a damaged or edited archive changes nothing (issue 4)."""

from __future__ import annotations

import io
import json
import tarfile

import mlx.core as mx
import pytest
from conftest import TEST_CHUNK
from sqlalchemy import select, text

import kvstore
from kvstore.index import schema
from kvstore.ops.archive import read_manifest
from kvstore.testing import KINDS, make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "a1" * 16


def open_store(path, **kw):
    return kvstore.open(path, chunk_size=C, **kw)


def store_state(store) -> dict:
    """Every file under the store (but the SQLite files) with its bytes, and every row of every table."""
    files = {}
    for p in sorted(store.path.rglob("*")):
        if p.is_file() and not p.name.startswith("index.db") and p.name != "gc.lock":
            files[str(p.relative_to(store.path))] = p.read_bytes()
    rows = {}
    with store.engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            rows[table.name] = sorted(tuple(r) for r in conn.execute(select(table)))
    return {"files": files, "rows": rows}


def read_members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_members(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def source(tmp_path):
    """A store with agent 'tech' (two snapshots, a label, metadata) sharing a prefix with agent 'biz'."""
    with open_store(tmp_path / "src") as store:
        prefix = tokens(3 * C, seed=1)
        t1 = prefix + tokens(C + 5, seed=2)
        store.save("tech", make_cache("kv", len(t1), seed=2), t1, model=FP, meta={"role": "tech"}, label="first")
        t2 = t1 + tokens(C, seed=3)
        cache = make_cache("kv", len(t2), seed=2)
        store.save("tech", cache, t2, model=FP, meta={"role": "tech", "turns": 2})
        tb = prefix + tokens(7, seed=4)
        store.save("biz", make_cache("kv", len(tb), seed=2), tb, model=FP)
        yield store


@pytest.mark.parametrize("kind", KINDS)
def test_export_import_restores_bit_exact(tmp_path, kind):
    toks = tokens(3 * C + 7, seed=5)
    cache = make_cache(kind, len(toks), mx.bfloat16, seed=5)
    with open_store(tmp_path / "a") as src:
        src.save("agent", cache, toks, model=FP, meta={"role": "r"})
        sent = kvstore.export_agent(src, "agent", tmp_path / "agent.tar")
    with open_store(tmp_path / "b") as dst:
        got = kvstore.import_agent(dst, tmp_path / "agent.tar")
        assert (got.agent, got.blobs_written, got.blobs_reused) == ("agent", sent.blobs, 0)
        loaded, got_tokens = dst.load("agent", model=FP)
        assert got_tokens == toks
        assert same_cache(cache, loaded)
        assert dst.agent("agent").meta == {"role": "r"}
        assert dst.fsck().ok


def test_import_keeps_history_and_dedups(tmp_path, source):
    kvstore.export_agent(source, "tech", tmp_path / "tech.tar")
    kvstore.export_agent(source, "biz", tmp_path / "biz.tar")
    with open_store(tmp_path / "dst") as dst:
        first = kvstore.import_agent(dst, tmp_path / "biz.tar")
        before = dst.stats()
        got = kvstore.import_agent(dst, tmp_path / "tech.tar")
        # biz brought the 3 shared prefix chunks: tech writes only its own chunks.
        assert first.blobs_written == 4
        assert got.blobs_reused == 3 and got.blobs_written == got.blobs - 3
        assert dst.stats().bytes_on_disk - before.bytes_on_disk == got.bytes_written
        assert [(s.n_tokens, s.label) for s in dst.snapshots("tech")] == [
            (s.n_tokens, s.label) for s in source.snapshots("tech")
        ]
        assert dst.agent("tech").meta == {"role": "tech", "turns": 2}
        for name in ("tech", "biz"):
            a, ta = source.load(name, model=FP)
            b, tb = dst.load(name, model=FP)
            assert ta == tb and same_cache(a, b)
        older = dst.snapshots("tech")[0].id
        a, _ = source.load("tech", model=FP, snapshot=source.snapshots("tech")[0].id)
        b, _ = dst.load("tech", model=FP, snapshot=older)
        assert same_cache(a, b)
        assert dst.fsck().ok


def test_import_under_another_name_and_refuses_a_clash(tmp_path, source):
    kvstore.export_agent(source, "biz", tmp_path / "biz.tar")
    state = store_state(source)
    with pytest.raises(kvstore.AgentExistsError):
        kvstore.import_agent(source, tmp_path / "biz.tar")
    assert store_state(source) == state
    got = kvstore.import_agent(source, tmp_path / "biz.tar", name="biz-2")
    assert got.blobs_written == 0 and got.agent == "biz-2"
    a, _ = source.load("biz", model=FP)
    b, _ = source.load("biz-2", model=FP)
    assert same_cache(a, b)


def test_manifest_lists_what_the_issue_asks_for(tmp_path, source):
    kvstore.export_agent(source, "tech", tmp_path / "tech.tar")
    man = read_manifest(tmp_path / "tech.tar")
    assert man["agent"]["name"] == "tech" and man["model"]["fingerprint"] == FP
    assert man["chunk_size"] == C and len(man["snapshots"]) == 2 and man["head"] == 1
    assert man["snapshots"][1]["chunks"] == [k.hex() for k in kvstore.chunk_keys(FP, man["snapshots"][1]["tokens"], C)]
    members = read_members(tmp_path / "tech.tar")
    # The manifest comes first, so a reader knows what follows before it sees a blob.
    assert list(members) == ["manifest.json"] + [f"blobs/{b['id']}.safetensors" for b in man["blobs"]]
    assert all(len(members[f"blobs/{b['id']}.safetensors"]) == b["nbytes"] for b in man["blobs"])


def test_export_refuses_overwrite_and_damaged_blobs(tmp_path, source):
    out = tmp_path / "tech.tar"
    kvstore.export_agent(source, "tech", out)
    with pytest.raises(FileExistsError):
        kvstore.export_agent(source, "tech", out)
    with source.engine.connect() as conn:
        blob = conn.execute(text("SELECT blob_id FROM chunk_layers LIMIT 1")).scalar()
    p = source.blobs.path(blob)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(kvstore.CorruptBlobError):
        kvstore.export_agent(source, "tech", tmp_path / "again.tar")
    assert not (tmp_path / "again.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _flip_blob_byte(path):
    with tarfile.open(path, "r:") as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("blobs/"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def _edit_manifest(edit):
    def apply(path):
        members = read_members(path)
        man = json.loads(members["manifest.json"])
        edit(man)
        members["manifest.json"] = json.dumps(man).encode()
        write_members(path, members)

    return apply


def _edit_members(edit):
    def apply(path):
        members = read_members(path)
        edit(members)
        write_members(path, members)

    return apply


def _tokens(man):
    man["snapshots"][-1]["tokens"][C + 2] += 1


def _tokens_and_keys(man):
    """Edit a token and re-derive the chunk list too: the blobs then belong to other keys."""
    snap = man["snapshots"][-1]
    snap["tokens"][C + 2] += 1
    snap["chunks"] = [k.hex() for k in kvstore.chunk_keys(man["model"]["fingerprint"], snap["tokens"], C)]


def _swap_blobs(members):
    """Point a full chunk's layers at the partial tail chunk's blob (a valid blob in the wrong place),
    dropping the full chunk's own blob so that only the blob's header can tell."""
    man = json.loads(members["manifest.json"])
    tail_key, full_key = man["snapshots"][-1]["chunks"][-1], man["snapshots"][-1]["chunks"][0]
    tail_blob = next(r["blob"] for r in man["layers"] if r["chunk"] == tail_key)
    full_blob = next(r["blob"] for r in man["layers"] if r["chunk"] == full_key)
    for r in man["layers"]:
        if r["chunk"] == full_key:
            r["blob"] = tail_blob
    man["blobs"] = [b for b in man["blobs"] if b["id"] != full_blob]
    members.pop(f"blobs/{full_blob}.safetensors")
    members["manifest.json"] = json.dumps(man).encode()


TAMPERING = {
    "flip a byte of a blob": _flip_blob_byte,
    "edit a token": _edit_manifest(_tokens),
    "edit a token and its keys": _edit_manifest(_tokens_and_keys),
    "change a blob size": _edit_manifest(lambda m: m["blobs"][0].update(nbytes=m["blobs"][0]["nbytes"] + 1)),
    "point a chunk at another blob": _edit_members(_swap_blobs),
    "drop a chunk row": _edit_manifest(lambda m: m["chunks"].pop()),
    "move the head": _edit_manifest(lambda m: m.update(head=5)),
    "bad layout": _edit_manifest(lambda m: m["model"].update(layout={"tree": [0], "slots": [["Pickle", "kv", []]]})),
    "missing blob": _edit_members(lambda ms: ms.pop(next(n for n in ms if n.startswith("blobs/")))),
    "extra member": _edit_members(lambda ms: ms.update({"../evil": b"x"})),
    "truncated blob": _edit_members(
        lambda ms: ms.update({(n := next(k for k in ms if k.startswith("blobs/"))): ms[n][:-9]})
    ),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_archive_is_refused_and_changes_nothing(tmp_path, source, how):
    archive = tmp_path / "tech.tar"
    kvstore.export_agent(source, "tech", archive)
    TAMPERING[how](archive)
    with open_store(tmp_path / "dst") as dst:
        # The target already holds one agent, so "unchanged" covers rows and files that exist.
        t = tokens(C + 3, seed=9)
        dst.save("other", make_cache("kv", len(t), seed=9), t, model=FP)
        before = store_state(dst)
        with pytest.raises(kvstore.ArchiveError):
            kvstore.import_agent(dst, archive)
        assert store_state(dst) == before
        assert dst.fsck().ok


def test_not_an_archive(tmp_path, source):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(kvstore.ArchiveError):
        kvstore.import_agent(source, junk)
    kvstore.export_agent(source, "biz", tmp_path / "biz.tar")
    with tarfile.open(tmp_path / "biz.tgz", "w:gz") as tar:
        tar.add(tmp_path / "biz.tar", arcname="manifest.json")
    with pytest.raises(kvstore.ArchiveError):
        kvstore.import_agent(source, tmp_path / "biz.tgz")


def test_other_chunk_size_or_model_layout_is_refused(tmp_path, source):
    kvstore.export_agent(source, "biz", tmp_path / "biz.tar")
    with kvstore.open(tmp_path / "big-chunks", chunk_size=2 * C) as dst:
        with pytest.raises(kvstore.ArchiveError, match="chunk size"):
            kvstore.import_agent(dst, tmp_path / "biz.tar")
    with open_store(tmp_path / "other-layout") as dst:
        t = tokens(5, seed=1)
        dst.save("x", make_cache("kv", 5, layers=2, seed=1), t, model=FP)  # same fingerprint, 2 layers not 3
        before = store_state(dst)
        with pytest.raises(kvstore.ModelMismatchError):  # merged, its layout would clash with the store's
            kvstore.import_agent(dst, tmp_path / "biz.tar", trust=True)
        assert store_state(dst) == before
        # Kept apart (the default) it clashes with nothing, and the store's own model is untouched.
        assert not kvstore.import_agent(dst, tmp_path / "biz.tar").merged
        dst.save("x", make_cache("kv", 5, layers=2, seed=1), t, model=FP)
        assert dst.load("biz", model=FP)[1] == source.tokens("biz")
        assert dst.fsck().ok


def test_a_clash_found_at_commit_removes_the_blobs_written(tmp_path, source):
    """Another process takes the name while the import writes blobs: nothing of the import stays."""
    kvstore.export_agent(source, "tech", tmp_path / "tech.tar")
    with open_store(tmp_path / "dst") as dst, open_store(tmp_path / "dst") as rival:
        t = tokens(4, seed=3)
        dst.save("seed", make_cache("kv", 4, seed=3), t, model=FP)
        before = store_state(dst)
        total = {}

        def progress(done, grand):
            total.setdefault("verified", done)  # the first call is during verification
            if done == grand and not total.get("raced"):
                total["raced"] = True
                rival.fork("seed", "tech")  # the write phase is over: the commit will find the name taken

        with pytest.raises(kvstore.AgentExistsError):
            kvstore.import_agent(dst, tmp_path / "tech.tar", progress=progress)
        assert total.get("raced")
        after = store_state(dst)
        assert after["files"] == before["files"]
        assert after["rows"]["blobs"] == before["rows"]["blobs"]
        assert [r[1] for r in after["rows"]["agents"]] == ["seed", "tech"]
        assert dst.fsck().ok
