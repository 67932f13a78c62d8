"""kvstore.index.commit: the one path a snapshot chain is committed through, and its optimistic retry."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TEST_CHUNK

import kvstore
from kvstore.index import commit, db
from kvstore.testing import make_cache, same_cache, tokens

C = TEST_CHUNK
FP = "c7" * 16


def test_retrying_runs_attempts_in_order_and_gives_up_with_a_store_error():
    seen: list[int] = []

    def attempt(n: int) -> str:
        seen.append(n)
        if n < 2:
            raise commit.Retry()
        return "done"

    assert commit.retrying(attempt, attempts=3, gave_up="no") == "done"
    assert seen == [0, 1, 2]

    def never(n: int) -> str:
        raise commit.Retry()

    with pytest.raises(kvstore.StoreError, match="^gave up$"):
        commit.retrying(never, attempts=2, gave_up="gave up")


def test_a_commit_reusing_a_layer_row_that_is_gone_writes_nothing(tmp_path):
    with kvstore.open(tmp_path / "s", chunk_size=C) as store:
        toks = np.asarray(tokens(C), dtype="<u4")
        chain = commit.Chain(
            model=commit.ModelEntry(fingerprint=FP, layout="{}"),
            agent=commit.AgentEntry(name="a", meta_json=None, created=1.0, updated=1.0, new=True),
            snapshots=[commit.NewSnapshot(tokens=toks, keys=[b"k" * 16], created=1.0)],
            head=0,
        )
        with pytest.raises(commit.Retry):
            with db.transaction(store.engine, write=True, what="test") as conn:
                commit.commit_chain(conn, chain, chunk_size=C, now=1.0, reused={(b"k" * 16, 0)})
        assert store.agents() == []
        assert store.fsck().ok


def test_an_import_whose_reused_chunks_a_gc_removed_meanwhile_writes_them_again(tmp_path, monkeypatch):
    """Between an import's plan and its commit a gc removes the chunks it planned to reuse (their only
    agent was deleted): the commit re-checks under the write lock and the import plans again."""
    from kvstore.ops import archive

    toks = tokens(3 * C, seed=7)
    cache = make_cache("kv", len(toks), mx.float16, seed=7)
    with kvstore.open(tmp_path / "src", chunk_size=C) as src:
        src.save("a", cache, toks, model=FP)
        sent = kvstore.export_agent(src, "a", tmp_path / "a.tar")
    with kvstore.open(tmp_path / "dst", chunk_size=C) as dst:
        dst.save("a", cache, toks, model=FP)  # the same chunks: a trusted import reuses every one
        real, calls = archive._commit, []

        def gc_in_between(*args, **kwargs):
            if not calls:
                dst.delete("a")
                assert dst.gc(grace=0).chunks_removed == 3
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(archive, "_commit", gc_in_between)
        got = kvstore.import_agent(dst, tmp_path / "a.tar", name="b", trust=True)
        assert len(calls) == 2  # planned twice
        assert got.blobs_written == sent.blobs and got.blobs_reused == 0
        loaded, got_tokens = dst.load("b", model=FP)
        assert got_tokens == toks and same_cache(cache, loaded)
        assert dst.fsck().ok
