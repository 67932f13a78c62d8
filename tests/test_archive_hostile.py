"""Hostile archives (issue 15, items 1 and 4-9): what a crafted archive must not be able to do.

Each test builds the crafted archive itself and fails on the code before the fix: poisoning other
agents' caches, a sparse-member decompression bomb, a quadratic PAX header, a layout that breaks
loads, JSON and times that break the CLI, blob ids that escape the store, and terminal escapes.
"""

from __future__ import annotations

import io
import json
import tarfile

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import TEST_CHUNK
from mlx_lm.models import cache as mlc
from test_archive import open_store, read_members, store_state, write_members

import kvstore
from kvstore.cli.main import cli
from kvstore.testing import make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "a1" * 16


def _export(tmp_path, cache, toks, name="agent", meta=None) -> Path:  # noqa: F821
    with open_store(tmp_path / f"src-{name}") as src:
        src.save(name, cache, toks, model=FP, meta=meta or {})
        kvstore.export_agent(src, name, tmp_path / f"{name}.tar")
    return tmp_path / f"{name}.tar"


def _relabel(path, new_tokens: list[int], fp: str = FP, out=None) -> None:
    """Give the archive's only snapshot other token ids and re-derive every key; blobs unchanged."""
    members = read_members(path)
    man = json.loads(members["manifest.json"])
    (snap,) = man["snapshots"]
    new_keys = [k.hex() for k in kvstore.chunk_keys(fp, new_tokens, C)]
    old_of = dict(zip(snap["chunks"], new_keys))
    snap["tokens"], snap["chunks"] = new_tokens, new_keys
    for row in man["chunks"]:
        row["key"] = old_of[row["key"]]
    for row in man["layers"]:
        row["chunk"] = old_of[row["chunk"]]
    members["manifest.json"] = json.dumps(man).encode()
    write_members(out or path, members)


# -- item 1: an import never changes what other agents restore -------------------------------------


def test_relabelled_archive_cannot_poison_local_caches(tmp_path):
    """An archive whose token ids were relabelled imports (its keys and blobs agree with each other);
    a local agent that then saves those token ids must still restore its own KV, bit for bit."""
    theirs = tokens(3 * C + 5, seed=1)
    archive = _export(tmp_path, make_cache("kv", len(theirs), seed=1), theirs, "imported")
    mine = tokens(3 * C + 5, seed=2)
    _relabel(archive, mine)
    with open_store(tmp_path / "dst") as dst:
        got = kvstore.import_agent(dst, archive)
        own = make_cache("kv", len(mine), seed=2)
        dst.save("local", own, mine, model=FP)
        restored, n = dst.restore(mine, model=FP)
        assert n == len(mine) and same_cache(restored, own)
        assert not got.merged and got.model == FP
        loaded, _ = dst.load("local", model=FP)
        assert same_cache(loaded, own)
        # The imported agent itself loads under the real model's fingerprint, and continues.
        theirs_loaded, toks = dst.load("imported", model=FP)
        assert toks == mine and same_cache(theirs_loaded, make_cache("kv", len(theirs), seed=1))
        longer = mine + tokens(C, seed=3)
        dst.save("imported", make_cache("kv", len(longer), seed=4), longer, model=FP)
        assert dst.load("imported", model=FP)[1] == longer
        assert dst.agent("imported").model == FP and {s.model for s in dst.snapshots("imported")} == {FP}
        assert dst.match(longer, model=FP).n_tokens == len(mine)  # the local agent's prefix, not theirs
        dst.delete("local")
        assert dst.match(mine, model=FP).n_tokens == 0  # invisible to every other agent
        assert dst.fsck().ok
        # Exported again, it is an ordinary archive of the real model: the keys are FP's again.
        kvstore.export_agent(dst, "imported", tmp_path / "again.tar")
        assert kvstore.ops.archive.read_manifest(tmp_path / "again.tar")["model"]["fingerprint"] == FP
        with open_store(tmp_path / "third") as third:
            assert kvstore.import_agent(third, tmp_path / "again.tar", trust=True).merged
            assert third.match(longer, model=FP).n_tokens == len(longer)
            assert third.load("imported", model=FP)[1] == longer
            assert third.fsck().ok


def test_trust_merges_the_archive_as_it_is(tmp_path):
    toks = tokens(2 * C + 3, seed=5)
    cache = make_cache("kv", len(toks), seed=5)
    archive = _export(tmp_path, cache, toks)
    with open_store(tmp_path / "dst") as dst:
        assert kvstore.import_agent(dst, archive, trust=True).merged
        restored, n = dst.restore(toks, model=FP)
        assert n == len(toks) and same_cache(restored, cache)
        assert dst.fsck().ok


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kvstore.models.builtin import load_builtin

    m, _tok = load_builtin("llama", root=tmp_path_factory.mktemp("models"))
    return m


def _prefill(model, toks):
    cache = mlc.make_prompt_cache(model)
    model(mx.array(toks)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_verify_with_the_model_merges_true_kv_and_refuses_relabelled_kv(tmp_path, model):
    fp = kvstore.fingerprint(model)
    toks = tokens(3 * C + 5, seed=6, vocab=500)
    with open_store(tmp_path / "src") as src:
        src.save("agent", _prefill(model, toks), toks, model=fp)
        kvstore.export_agent(src, "agent", tmp_path / "agent.tar")
    with open_store(tmp_path / "dst") as dst:
        got = kvstore.import_agent(dst, tmp_path / "agent.tar", verify=model)
        assert got.merged
        assert dst.match(toks, model=fp).n_tokens == len(toks)
        assert dst.fsck().ok
    # Relabelled: keys and blobs agree, but the model computes other KV for these token ids.
    other = toks[:C] + tokens(2 * C + 5, seed=7, vocab=500)
    _relabel(tmp_path / "agent.tar", other, fp, out=tmp_path / "bad.tar")
    with open_store(tmp_path / "dst2") as dst:
        before = store_state(dst)
        with pytest.raises(kvstore.ArchiveError, match="not what the model computes"):
            kvstore.import_agent(dst, tmp_path / "bad.tar", verify=model)
        assert store_state(dst) == before
        from kvstore.models.builtin import load_builtin

        other_model, _ = load_builtin("llama", seed=1, root=tmp_path / "other")
        with pytest.raises(kvstore.ArchiveError, match="fingerprint"):  # another model cannot vouch for it
            kvstore.import_agent(dst, tmp_path / "agent.tar", verify=other_model)
        assert store_state(dst) == before


# -- item 4: a sparse member is a decompression bomb ----------------------------------------------


def test_sparse_member_is_refused_before_it_is_expanded(tmp_path):
    """A blob of mostly zeros written as a sparse member: tarfile would expand it to its full size
    from a fraction of the bytes. The archive is refused and the store is unchanged."""
    toks = tokens(2 * C, seed=8)
    zeros = make_cache("kv", len(toks), seed=8)
    for c in zeros:
        c.keys, c.values = mx.zeros_like(c.keys), mx.zeros_like(c.values)
    archive = _export(tmp_path, zeros, toks)
    members = read_members(archive)
    name = max((n for n in members if n.startswith("blobs/")), key=lambda n: len(members[n]))
    data = members[name]
    kept = len(data.rstrip(b"\0"))
    assert kept < len(data) // 2  # most of the blob is zeros: the sparse member is much smaller
    sparse = tmp_path / "sparse.tar"
    with tarfile.open(sparse, "w", format=tarfile.PAX_FORMAT) as tar:
        for n, d in members.items():
            info = tarfile.TarInfo(n)
            if n == name:
                info.pax_headers = {"GNU.sparse.map": f"0,{kept}", "GNU.sparse.size": str(len(d)), "GNU.sparse.name": n}
                info.size = kept
                tar.addfile(info, io.BytesIO(d[:kept]))
            else:
                info.size = len(d)
                tar.addfile(info, io.BytesIO(d))
    with tarfile.open(sparse) as tar:  # what tarfile itself would do: expand it
        assert tar.extractfile(name).read() == data
    with open_store(tmp_path / "dst") as dst:
        before = store_state(dst)
        with pytest.raises(kvstore.ArchiveError, match="sparse"):
            kvstore.import_agent(dst, sparse)
        assert store_state(dst) == before


# -- item 5: a PAX header that makes tarfile's regex quadratic ------------------------------------


def test_huge_pax_header_never_reaches_tarfile(tmp_path, monkeypatch):
    archive = _export(tmp_path, make_cache("kv", C, seed=9), tokens(C, seed=9))
    pax = b"1" * 100_000  # CVE-2024-6232: digits with no record behind them backtrack quadratically
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(pax)
    crafted = tmp_path / "pax.tar"
    crafted.write_bytes(
        info.tobuf(format=tarfile.USTAR_FORMAT) + pax + b"\0" * (-len(pax) % 512) + archive.read_bytes()
    )
    parsed = []
    real = tarfile.TarInfo._proc_pax
    monkeypatch.setattr(tarfile.TarInfo, "_proc_pax", lambda self, tar: parsed.append(1) or real(self, tar))
    with open_store(tmp_path / "dst") as dst:
        before = store_state(dst)
        with pytest.raises(kvstore.ArchiveError, match="extended header is 100000 bytes"):
            kvstore.import_agent(dst, crafted)
        with pytest.raises(kvstore.ArchiveError):
            kvstore.ops.archive.read_manifest(crafted)  # what `kvstore import` reads first
        assert parsed == [] and store_state(dst) == before
    # A short malformed PAX record is refused by the same scan.
    pax = b"99999999999999999999999 x"
    info.size = len(pax)
    crafted.write_bytes(
        info.tobuf(format=tarfile.USTAR_FORMAT) + pax + b"\0" * (-len(pax) % 512) + archive.read_bytes()
    )
    with open_store(tmp_path / "dst") as dst, pytest.raises(kvstore.ArchiveError, match="PAX"):
        kvstore.import_agent(dst, crafted)
    assert parsed == []


# -- items 6 and 7: layouts, nesting and times ------------------------------------------------------


def _layout(edit):
    def apply(man):
        edit(man["model"]["layout"])

    return apply


def _deep(n):
    out = {}
    for _ in range(n):
        out = {"a": out}
    return out


CRAFTED = {
    "tree names a slot twice": _layout(lambda lay: lay.update(tree=[0, 0, 1])),
    "tree names a missing slot": _layout(lambda lay: lay.update(tree=[0, 1, 7])),
    "tree holds text": _layout(lambda lay: lay.update(tree=[0, 1, "2"])),
    "tree nests another class": _layout(lambda lay: lay.update(tree=[0, 1, {"Pickle": [2]}])),
    "slot of the wrong kind": _layout(lambda lay: lay["slots"][0].__setitem__(1, "state")),
    "rotating slot without a window": _layout(lambda lay: lay["slots"].__setitem__(0, ["RotatingKVCache", "rot", []])),
    "quantized slot with 7 bits": _layout(
        lambda lay: lay["slots"].__setitem__(0, ["QuantizedKVCache", "kv", [["bits", 7], ["group_size", 64]]])
    ),
    "slot parameters not numbers": _layout(
        lambda lay: lay["slots"].__setitem__(0, ["ArraysCache", "state", [["size", "2"]]])
    ),
    "extra layout key": _layout(lambda lay: lay.update(extra=1)),
    "slot class unlike its blobs": _layout(
        lambda lay: lay["slots"].__setitem__(1, ["QuantizedKVCache", "kv", [["bits", 4], ["group_size", 64]]])
    ),
    "metadata nested 70 deep": lambda m: m["agent"].update(meta=_deep(70)),
    "manifest nested 100,000 deep": lambda m: m.update(junk=None),  # replaced below by raw text
    "created time Infinity": lambda m: m["agent"].update(created=float("inf")),
    "created time 1e300": lambda m: m["agent"].update(updated=1e300),
    "snapshot time NaN": lambda m: m["snapshots"][0].update(created=float("nan")),
    "negative time": lambda m: m["snapshots"][0].update(created=-5.0),
}


@pytest.mark.parametrize("how", list(CRAFTED))
def test_crafted_manifest_is_refused_before_anything_is_written(tmp_path, how):
    archive = _export(tmp_path, make_cache("kv", 2 * C + 3, seed=10), tokens(2 * C + 3, seed=10))
    members = read_members(archive)
    man = json.loads(members["manifest.json"])
    CRAFTED[how](man)
    raw = json.dumps(man).encode()
    if how.startswith("manifest nested"):
        raw = raw[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    members["manifest.json"] = raw
    write_members(archive, members)
    with open_store(tmp_path / "dst") as dst:
        before = store_state(dst)
        with pytest.raises(kvstore.ArchiveError):
            kvstore.import_agent(dst, archive)
        with pytest.raises(kvstore.ArchiveError):
            kvstore.import_agent(dst, archive, trust=True)
        assert store_state(dst) == before
        # Nothing blocks the real model: a save of it works and fsck is clean.
        t = tokens(5, seed=11)
        dst.save("real", make_cache("kv", 5, seed=11), t, model=FP)
        assert dst.fsck().ok


# -- item 8: blob ids are checked before a path is built from them ----------------------------------


def test_blob_ids_never_reach_outside_the_store(tmp_path):
    from kvstore.errors import InvalidBlobIdError

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"not yours")
    with open_store(tmp_path / "s") as store:
        t = tokens(C + 2, seed=12)
        store.save("a", make_cache("kv", len(t), seed=12), t, model=FP)
        crafted = "..../victim"  # blobs/.. / ../victim.safetensors: the folder above the store
        assert (store.blobs.blob_dir / crafted[:2] / (crafted[2:] + ".safetensors")).resolve() == victim.resolve()
        with pytest.raises(InvalidBlobIdError):
            store.discard_blob(crafted)
        with pytest.raises(InvalidBlobIdError):
            store.discard_blob("../../outside/x")
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO blobs (id, nbytes, created) VALUES (?, 9, 0)", (crafted,))
        report = store.fsck(repair=True)
        assert [(p.kind, crafted in p.detail) for p in report.problems] == [("corrupt_blob", True)]
        assert victim.read_bytes() == b"not yours"
        assert store.fsck().ok
        cache, toks = store.load("a", model=FP)
        assert toks == t


# -- item 9: terminal escapes in names and metadata -------------------------------------------------


def test_cli_shows_escapes_instead_of_sending_them(tmp_path):
    toks = tokens(C + 3, seed=13)
    archive = _export(
        tmp_path, make_cache("kv", len(toks), seed=13), toks, meta={"\x1b]0;owned\x07": 1, "\u202eevil": 2}
    )
    members = read_members(archive)
    man = json.loads(members["manifest.json"])
    man["model"]["name"] = "\x1b[2J\x1b[31mred\x9b"
    members["manifest.json"] = json.dumps(man).encode()
    write_members(archive, members)
    store = tmp_path / "dst"
    runner = CliRunner()
    got = runner.invoke(cli, ["--store", str(store), "import", str(archive)], catch_exceptions=False)
    assert got.exit_code == 0, got.output
    for args in (["models"], ["show", "agent"], ["agents"]):
        out = runner.invoke(cli, ["--store", str(store), *args], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        assert not any(ch in out.output for ch in "\x1b\x07\x9b\u202e"), (args, out.output)
    assert "\\x1b[31mred" in runner.invoke(cli, ["--store", str(store), "models"]).output
    assert "\\x1b]0;owned\\x07" in runner.invoke(cli, ["--store", str(store), "show", "agent"]).output


def test_import_flags(tmp_path):
    """`kvstore import --trust` merges; `--verify-with MODEL` verifies; the default keeps it apart."""
    from kvstore.models.builtin import builtin_model_path

    path = builtin_model_path("llama", root=tmp_path / "m")
    from mlx_lm import load

    m, _ = load(str(path))
    fp = kvstore.fingerprint(path)  # as the agent manager and `kvstore demo` name a model
    toks = tokens(2 * C + 1, seed=14, vocab=500)
    with open_store(tmp_path / "src") as src:
        src.save("agent", _prefill(m, toks), toks, model=fp)
        kvstore.export_agent(src, "agent", tmp_path / "a.tar")
    runner = CliRunner()
    for flags, merged in (([], False), (["--trust"], True), (["--verify-with", str(path)], True)):
        store = tmp_path / f"dst{len(flags)}"
        out = runner.invoke(
            cli, ["--store", str(store), "import", str(tmp_path / "a.tar"), *flags], catch_exceptions=False
        )
        assert out.exit_code == 0, out.output
        with kvstore.open(store) as dst:
            assert dst.match(toks, model=fp).n_tokens == (len(toks) if merged else 0)
            assert dst.load("agent", model=fp)[1] == toks
    out = runner.invoke(
        cli, ["--store", str(tmp_path / "x"), "import", str(tmp_path / "a.tar"), "--trust", "--verify-with", str(path)]
    )
    assert out.exit_code != 0 and "--trust" in out.output


def test_a_wrong_layout_left_by_an_import_does_not_block_the_model_after_rm(tmp_path):
    """A trusted archive of another layout under the model's fingerprint owns the model's row while its
    agent lives; once `rm` and `gc` leave nothing of it, the real model saves again."""
    toks = tokens(C + 3, seed=15)
    archive = _export(tmp_path, make_cache("kv", len(toks), layers=2, seed=15), toks)  # 2 layers, not 3
    with open_store(tmp_path / "dst") as dst:
        kvstore.import_agent(dst, archive, trust=True)
        real = make_cache("kv", len(toks), seed=16)
        with pytest.raises(kvstore.ModelMismatchError):  # its agent still uses that layout
            dst.save("real", real, toks, model=FP)
        dst.delete("agent")
        dst.gc(grace=0)
        dst.save("real", real, toks, model=FP)
        loaded, _ = dst.load("real", model=FP)
        assert same_cache(loaded, real)
        assert dst.fsck().ok
