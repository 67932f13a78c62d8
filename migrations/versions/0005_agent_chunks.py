"""agent_chunks: which agents' snapshots list each chunk, in place of an index of snapshot_chunks by chunk.

A turn's save late in a chat lists every chunk of its history again; the index of those rows by chunk
took a write on a page of its own for each of them, so a turn's save grew with the history although it
wrote the same bytes (issue 23, point 5). agent_chunks gets a row only for a chunk new to the agent; the
lookups by chunk (gc's reachability, sharing, a match's token check) go through it. Filled here from
the chunk lists as they are.

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
    op.drop_index("ix_snapshot_chunks_chunk", table_name="snapshot_chunks")


def downgrade() -> None:
    op.create_index("ix_snapshot_chunks_chunk", "snapshot_chunks", ["chunk_key"])
    op.drop_index("ix_agent_chunks_agent", table_name="agent_chunks")
    op.drop_table("agent_chunks")
