"""agent_chunks: which agents' snapshots list each chunk, in place of an index of snapshot_chunks by chunk.

A turn's save late in a chat lists every chunk of its history again; the index of those rows by chunk
took a write on a page of its own for each of them, so a turn's save grew with the history although it
wrote the same bytes (issue 23, point 5). agent_chunks gets a row only for a chunk new to the agent; the
lookups by chunk (gc's reachability, sharing, a match's token check) go through it. Filled here from
the chunk lists as they are.

Without that index, snapshot_chunks loses its foreign key to chunks too: the database would scan the
whole table for every chunk gc deletes (gc deletes only chunks no agent_chunks row names). SQLite cannot
drop a constraint, so the table is rebuilt there (its rows copied).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _rebuild_snapshot_chunks(chunk_fk: bool) -> None:
    """SQLite: snapshot_chunks made again with or without its foreign key to chunks, its rows copied."""
    key = [sa.ForeignKey("chunks.key")] if chunk_fk else []
    op.create_table(
        "snapshot_chunks_new",
        sa.Column("snapshot_id", sa.Integer, sa.ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("chunk_key", sa.LargeBinary(16), *key, nullable=False),
    )
    op.execute("INSERT INTO snapshot_chunks_new (snapshot_id, seq, chunk_key) SELECT snapshot_id, seq, chunk_key "
               "FROM snapshot_chunks")
    op.drop_table("snapshot_chunks")  # its indexes go with it
    op.rename_table("snapshot_chunks_new", "snapshot_chunks")


def upgrade() -> None:
    op.create_table(
        "agent_chunks",
        sa.Column("chunk_key", sa.LargeBinary(16), sa.ForeignKey("chunks.key"), primary_key=True),
        sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_agent_chunks_agent", "agent_chunks", ["agent_id"])
    op.execute(
        "INSERT INTO agent_chunks (chunk_key, agent_id) SELECT DISTINCT sc.chunk_key, s.agent_id "
        "FROM snapshot_chunks sc JOIN snapshots s ON s.id = sc.snapshot_id"
    )
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_snapshot_chunks(chunk_fk=False)
        return
    op.drop_index("ix_snapshot_chunks_chunk", table_name="snapshot_chunks")
    for fk in sa.inspect(op.get_bind()).get_foreign_keys("snapshot_chunks"):
        if fk["referred_table"] == "chunks":
            op.drop_constraint(fk["name"], "snapshot_chunks", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_snapshot_chunks(chunk_fk=True)
    else:
        op.create_foreign_key(None, "snapshot_chunks", "chunks", ["chunk_key"], ["key"])
    op.create_index("ix_snapshot_chunks_chunk", "snapshot_chunks", ["chunk_key"])
    op.drop_index("ix_agent_chunks_agent", table_name="agent_chunks")
    op.drop_table("agent_chunks")
