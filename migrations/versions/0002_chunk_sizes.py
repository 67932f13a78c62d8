"""Chunk sizes in the index: chunks.nbytes and chunks.prefix_bytes (issue 4: `info`/`agents` in < 1 s).

Adds the columns and fills them from the rows already there: nbytes from each chunk's layer rows
and blob sizes, prefix_bytes by walking every chain from its chunk 0. Chunks an archive import
stored without a parent get it back first (the previous key of a snapshot that lists them, or the
model fingerprint for chunk 0), since the walk and every later size change follow parent links.

The SQL is written out here rather than imported from kvstore.index.sizes: a revision must keep doing
what it did when later code changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_CHUNK_BYTES = ("(SELECT COALESCE(SUM(b.nbytes), 0) FROM blobs b WHERE b.id IN "
                "(SELECT cl.blob_id FROM chunk_layers cl WHERE cl.chunk_key = chunks.key))")


def upgrade() -> None:
    op.add_column("chunks", sa.Column("nbytes", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("chunks", sa.Column("prefix_bytes", sa.BigInteger, nullable=False, server_default="0"))
    conn = op.get_bind()
    conn.execute(sa.text(
        "UPDATE chunks SET parent = (SELECT p.chunk_key FROM snapshot_chunks sc JOIN snapshot_chunks p "
        "ON p.snapshot_id = sc.snapshot_id AND p.seq = sc.seq - 1 WHERE sc.chunk_key = chunks.key LIMIT 1) "
        "WHERE parent IS NULL AND seq > 0"))
    # Chunk 0's parent is the model fingerprint's bytes (SQLite before 3.41 has no unhex()).
    models = conn.execute(sa.text("SELECT DISTINCT m.id, m.fingerprint FROM models m JOIN chunks c "
                                  "ON c.model_id = m.id WHERE c.parent IS NULL AND c.seq = 0")).all()
    for model_id, fp in models:
        conn.execute(sa.text("UPDATE chunks SET parent = :p WHERE parent IS NULL AND seq = 0 AND model_id = :m")
                     .bindparams(sa.bindparam("p", type_=sa.LargeBinary)), {"p": bytes.fromhex(fp), "m": model_id})
    conn.execute(sa.text(f"UPDATE chunks SET nbytes = {_CHUNK_BYTES}"))
    walk = sa.Table("kvstore_prefix_walk", sa.MetaData(), sa.Column("key", sa.LargeBinary(16), primary_key=True),
                    sa.Column("total", sa.BigInteger, nullable=False), prefixes=["TEMPORARY"])
    walk.create(conn)
    # seq = w.seq + 1 bounds the walk even if damaged parent links loop.
    conn.execute(sa.text("""
        WITH RECURSIVE w(key, seq, total) AS (
            SELECT key, seq, nbytes FROM chunks WHERE seq = 0
            UNION ALL
            SELECT c.key, c.seq, w.total + c.nbytes FROM chunks c JOIN w ON c.parent = w.key AND c.seq = w.seq + 1)
        INSERT INTO kvstore_prefix_walk (key, total) SELECT key, total FROM w"""))
    conn.execute(sa.text("UPDATE chunks SET prefix_bytes = COALESCE((SELECT t.total FROM kvstore_prefix_walk t "
                         "WHERE t.key = chunks.key), nbytes)"))
    walk.drop(conn)


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("prefix_bytes")
        batch.drop_column("nbytes")
