"""Corruption: flip, truncate or delete each kind of file (blob, index.db, index.db-wal).

Every damaged blob is found by fsck with the exact problem set; nothing damaged is ever restored as
if it were right (a load is bit-exact or a StoreError); `fsck(repair=True)` leaves a consistent
store that keeps every intact snapshot and every agent's token history.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import kvstore
import kvstore.errors
from kvstore.errors import StoreError

from . import report, synth
from .damage import blobs_by_snapshot, check_prefix_restores, check_restores, flip_byte, populate, token_history

MODES = ("flip", "truncate", "delete", "append", "empty")
KIND = {
    "flip": "corrupt_blob",
    "truncate": "corrupt_blob",
    "delete": "missing_blob",
    "append": "corrupt_blob",
    "empty": "corrupt_blob",
}


def damage_blob(path, mode: str, rng: random.Random) -> None:
    size = path.stat().st_size
    if mode == "flip":
        flip_byte(path, rng.randrange(size), 1 << rng.randrange(8))
    elif mode == "truncate":
        os.truncate(path, rng.randrange(1, size))
    elif mode == "delete":
        path.unlink()
    elif mode == "append":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        os.truncate(path, 0)


@pytest.fixture
def populated(tmp_path):
    store = kvstore.open(tmp_path / "store", chunk_size=synth.CHUNK)
    exp = populate(store)
    yield store, exp
    store.close()


def test_fsck_finds_every_damaged_blob_exactly(populated):
    store, _exp = populated
    rng = random.Random(1)
    ids = sorted(b for b, _ in store.blobs.iter_files())
    expected = set()
    for i, blob_id in enumerate(ids):
        mode = MODES[i % len(MODES)]
        damage_blob(store.blobs.path(blob_id), mode, rng)
        expected.add((KIND[mode], blob_id))
    found = store.fsck()
    assert {(p.kind, p.subject) for p in found.problems} == expected
    assert len(found.problems) == len(ids)
    report.record("corruption", blobs_damaged=len(ids), blobs_detected=len(found.problems))


@pytest.mark.parametrize("mode", MODES)
def test_damaged_blob_never_restores_wrong_and_repair_keeps_the_rest(populated, mode):
    store, exp = populated
    rng = random.Random(MODES.index(mode))
    used = blobs_by_snapshot(store)
    snaps = exp.snapshots(store)
    history = token_history(store)
    # A blob that some snapshots need and others do not, so both sides of the promise are tested.
    candidates = sorted(set.union(*used.values()) - set.intersection(*used.values()))
    victim = rng.choice(candidates)
    hit = {sid for sid, blobs in used.items() if victim in blobs}
    damage_blob(store.blobs.path(victim), mode, rng)

    assert {(p.kind, p.subject) for p in store.fsck().problems} == {(KIND[mode], victim)}
    outcome = check_restores(store, snaps)
    assert {sid for sid, o in outcome.items() if o != "ok"} == hit & set(snaps)
    assert {o for o in outcome.values() if o != "ok"} <= {"CorruptBlobError", "MissingBlobError"}
    check_prefix_restores(store, exp.heads)

    fixed = store.fsck(repair=True)
    assert fixed.repaired and set(fixed.needs_recompute) == hit
    assert store.fsck().problems == ()
    assert token_history(store) == history  # every agent keeps its token history
    outcome = check_restores(store, snaps)
    assert {sid for sid, o in outcome.items() if o == "ok"} == set(snaps) - hit  # intact ones come back exact
    assert {o for o in outcome.values() if o != "ok"} <= {"MissingBlobError"}
    # Recomputing a damaged agent's KV from its kept tokens makes it whole again.
    for sid in hit & set(snaps):
        name, tokens = snaps[sid]
        if store.agent(name).head == sid:
            store.save(name, synth.make_cache(tokens), tokens, model=synth.FP)
    heads = {store.agent(n).head: (n, t) for n, t in exp.heads.items()}
    assert set(check_restores(store, heads).values()) == {"ok"}
    store.gc(grace=0)
    assert store.fsck(grace=0).problems == ()
    report.record("corruption", blob_repairs=1)


def _image(src, dst):
    """A copy of a store's index files, its blob folder shared (the trials only read blobs)."""
    dst.mkdir()
    for name in os.listdir(src):
        if name.startswith("index.db") and not name.endswith("-shm"):
            shutil.copy2(src / name, dst / name)
    (dst / "blobs").symlink_to(src / "blobs")
    (dst / "tmp").mkdir()
    return dst


def _try_everything(path, exp: kvstore.Store, snaps) -> str:
    """Open and restore everything: "ok" when all of it is bit-exact, else the first StoreError's class."""
    try:
        with kvstore.open(path) as store:
            outcome = check_restores(store, snaps)
            errors = check_prefix_restores(store, exp.heads)
            names = sorted(a.name for a in store.agents())
            bad = sorted(o for o in outcome.values() if o != "ok")
            if bad:
                return bad[0]
            clean = store.fsck().ok
            if errors or names != sorted(exp.heads):
                # Something is missing: acceptable only when fsck says so (never a silent loss).
                return "incomplete_found" if not clean else "incomplete_silent"
            return "ok" if clean else "fsck_found"
    except kvstore.StoreError as e:
        return type(e).__name__


def test_missing_or_empty_index_is_refused(populated, tmp_path):
    store, _ = populated
    store.close()
    gone = _image(store.path, tmp_path / "gone")
    (gone / "index.db").unlink()
    with pytest.raises(kvstore.NotAStoreError):
        kvstore.open(gone)
    empty = _image(store.path, tmp_path / "empty")
    os.truncate(empty / "index.db", 0)
    with pytest.raises(kvstore.IndexDatabaseError, match="empty but the store holds blobs"):
        kvstore.open(empty)


@pytest.mark.parametrize("where", ["header", "truncated"])
def test_damaged_index_gives_a_clear_error(populated, tmp_path, where):
    store, exp = populated
    snaps = exp.snapshots(store)
    store.close()
    img = _image(store.path, tmp_path / "img")
    if where == "header":
        flip_byte(img / "index.db", 3, 0xFF)  # "SQLite format 3" -> not a database
    else:
        os.truncate(img / "index.db", (img / "index.db").stat().st_size // 2)
    assert _try_everything(img, exp, snaps) == "IndexDatabaseError"


@pytest.mark.slow
def test_random_index_flips_never_restore_wrong(populated, tmp_path):
    """Flip one random bit of index.db at a time: each outcome is all-correct or a StoreError, never wrong."""
    store, exp = populated
    snaps = exp.snapshots(store)
    store.close()
    size = (store.path / "index.db").stat().st_size
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    trials = 120
    for i in range(trials):
        img = _image(store.path, tmp_path / f"flip{i}")
        flip_byte(img / "index.db", rng.randrange(size), 1 << rng.randrange(8))
        result = _try_everything(img, exp, snaps)
        outcomes[result] = outcomes.get(result, 0) + 1
        shutil.rmtree(img)
    # Every outcome is bit-exact ("ok"), found by fsck, or a StoreError; never a silent loss. (A wrong
    # cache fails inside check_restores; another exception fails the test where it is raised.)
    # (A StoreError of any kind: e.g. a flipped bit in a blob id's text is an InvalidBlobIdError, a CorruptBlobError.)
    store_errors = {n for n, c in vars(kvstore.errors).items() if isinstance(c, type) and issubclass(c, StoreError)}
    allowed = {"ok", "fsck_found", "incomplete_found"} | store_errors
    assert set(outcomes) <= allowed, outcomes
    assert outcomes.get("ok", 0) < trials  # the flips did damage something that was noticed
    report.record(
        "corruption",
        index_flips=trials,
        index_flips_harmless=outcomes.get("ok", 0),
        index_flips_detected=trials - outcomes.get("ok", 0),
        index_flip_outcomes=outcomes,
    )


@pytest.mark.parametrize("mode", ["flip_last_frame", "truncate", "delete"])
def test_damaged_wal_falls_back_to_an_intact_commit(tmp_path, mode):
    """A crash image whose WAL is damaged: SQLite drops the frames after the damage, never half of a commit."""
    store = kvstore.open(tmp_path / "store", chunk_size=synth.CHUNK)
    exp = populate(store)
    history = {name: [] for name in exp.heads}
    for _sid, (name, tokens) in token_history(store).items():
        history[name].append(tokens)
    wal = store.path / "index.db-wal"
    assert wal.stat().st_size > 0  # the commits still live in the WAL (no checkpoint yet)
    img = _image(store.path, tmp_path / "img")
    store.close()
    if mode == "flip_last_frame":
        flip_byte(img / "index.db-wal", (img / "index.db-wal").stat().st_size - 100)
    elif mode == "truncate":
        os.truncate(img / "index.db-wal", (img / "index.db-wal").stat().st_size // 2)
    else:
        (img / "index.db-wal").unlink()
    shutil.rmtree(img / "blobs" if not (img / "blobs").is_symlink() else img / "tmp")
    (img / "blobs").unlink()
    shutil.copytree(store.path / "blobs", img / "blobs")  # repair may delete files: give it its own
    (img / "tmp").mkdir(exist_ok=True)
    # SQLite checksums every WAL frame and stops at the first bad one: the store opens whatever the
    # damage, and holds the commits before it (any StoreError here would be a needless refusal).
    reopened = kvstore.open(img)
    with reopened:
        for info in reopened.agents():  # whatever survived is one of the agent's committed states
            cache, tokens = reopened.load(info.name, model=synth.FP)
            assert tokens in history[info.name]
            assert synth.checksum(cache) == synth.expected_sum(tokens)
        reopened.fsck(repair=True, grace=0)
        assert reopened.fsck(grace=0).problems == ()
        report.record(
            "corruption",
            wal_damage_rolled_back=1,
            wal_agents_kept=len(reopened.agents()),
            wal_agents_committed=len(exp.heads),
        )


def test_damaged_index_values_are_found_and_repaired(populated):
    """Values damaged inside intact pages: a token count, an agent's metadata JSON, a snapshot's chunk list."""
    store, exp = populated
    snaps = exp.snapshots(store)
    head = store.agent("a1").head
    from sqlalchemy import text as sql

    with store.engine.begin() as conn:
        conn.execute(sql("UPDATE snapshots SET n_tokens = n_tokens + 1 WHERE id = :i"), {"i": head})
        conn.execute(sql("UPDATE agents SET meta = '{\"role\": \x02oops' WHERE name = 'a2'"))
        conn.execute(
            sql("DELETE FROM snapshot_chunks WHERE snapshot_id = :i AND seq = 0"), {"i": store.agent("a3").head}
        )
    found = {(p.kind, p.subject) for p in store.fsck().problems}
    assert found == {
        ("token_mismatch", f"snapshot {head}"),
        ("damaged_meta", "agent a2"),
        ("token_mismatch", f"snapshot {store.agent('a3').head}"),
    }
    with pytest.raises(kvstore.TokenMismatchError):
        store.load("a1", model=synth.FP)
    with pytest.raises(kvstore.IndexDatabaseError):
        store.agents()
    store.fsck(repair=True)
    assert store.fsck().problems == ()
    assert set(check_restores(store, snaps).values()) == {"ok"}
    assert "oops" in store.agent("a2").meta["damaged_meta"]  # the damaged text is kept for a person to read
    report.record("corruption", index_values_damaged=3, index_values_repaired=3)
