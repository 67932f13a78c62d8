"""The save path's IN-list lookups (kvstore.index.prepared.PreparedIn, issue 23): the same rows as SQLAlchemy's
expanding IN at every width and across parts, and a presence check by counting that misses nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, insert, select

from kvstore.index import db, queries, schema
from kvstore.index.prepared import PreparedIn
from kvstore.testing import make_cache, tokens

CL = schema.chunk_layers


@pytest.fixture
def long_store(tmp_path, backend):
    """A store (chunks of 4 tokens) holding one agent of 1,700 tokens: 425 chunks of 3 layers each."""
    from tests.conftest import make_store

    s = make_store(tmp_path, backend, chunk_size=4)
    s.save("long", make_cache("kv", 1700), tokens(1700), model="ab" * 16)
    yield s
    s.close()


def _keys(store) -> list[bytes]:
    with db.transaction(store.engine, write=False, what="test") as conn:
        return [bytes(k) for (k,) in conn.execute(select(schema.chunks.c.key).order_by(schema.chunks.c.seq))]


def test_existing_layers_matches_an_expanding_in_at_every_width(long_store):
    keys = _keys(long_store)
    assert len(keys) == 425
    widths = PreparedIn.WIDTHS
    counts = sorted({0, 1, *widths, *(w + 1 for w in widths), 2 * widths[-1] + 3, len(keys)} - {len(keys) + 1})
    with db.transaction(long_store.engine, write=False, what="test") as conn:
        for n in counts:
            part = keys[:n] + [b"\0" * 16]  # a key the index lacks finds nothing
            want = {
                (bytes(k), layer): first
                for k, layer, first in conn.execute(select(CL.c.chunk_key, CL.c.layer, CL.c.first))
                if bytes(k) in set(part)
            }
            assert queries.existing_layers(conn, part) == want, n
            assert len(want) == 3 * min(n, len(keys))


def test_layers_present_counts_exactly(long_store):
    keys = _keys(long_store)
    with long_store.engine.connect() as conn:  # closed without a commit: the changes below roll back
        have = queries.existing_layers(conn, keys)
        assert len(have) == 3 * 425 and queries.layers_present(conn, have)
        # Keys with different sets of slots go in separate counts.
        uneven = {p for p in have if p[1] != 2 or p[0] in keys[:10]}
        assert queries.layers_present(conn, uneven)
        # One row gone and another (a slot this save does not rely on) added: the count still sees the loss.
        gone = keys[300]
        blob_id = conn.execute(select(CL.c.blob_id).where(CL.c.chunk_key == gone, CL.c.layer == 1)).scalar()
        conn.execute(delete(CL).where(CL.c.chunk_key == gone, CL.c.layer == 1))
        conn.execute(insert(CL).values(chunk_key=gone, layer=7, blob_id=blob_id, first=0))
        assert not queries.layers_present(conn, have)
        assert not queries.layers_present(conn, uneven)
        assert queries.layers_present(conn, {p for p in have if p[0] != gone})
        # Slots with a gap (0 and 2) are counted by list, not by range: still exact.
        gapped = {p for p in have if p[1] != 1}
        assert queries.layers_present(conn, gapped)
        conn.execute(delete(CL).where(CL.c.chunk_key == gone, CL.c.layer == 2))
        conn.execute(insert(CL).values(chunk_key=gone, layer=1, blob_id=blob_id, first=0))
        assert not queries.layers_present(conn, gapped)
        assert queries.layers_present(conn, {})
