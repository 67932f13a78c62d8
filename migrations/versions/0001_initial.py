"""The initial index schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "store_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(32), nullable=False, unique=True),
        sa.Column("name", sa.Text),
        sa.Column("layout", sa.Text),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "chunks",
        sa.Column("key", sa.LargeBinary(16), primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("length", sa.Integer, nullable=False),
        sa.Column("parent", sa.LargeBinary(16)),
    )
    op.create_index("ix_chunks_parent", "chunks", ["parent"])
    op.create_table(
        "chunk_layers",
        sa.Column("chunk_key", sa.LargeBinary(16), sa.ForeignKey("chunks.key", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("layer", sa.Integer, primary_key=True),
        sa.Column("blob_id", sa.String(32), sa.ForeignKey("blobs.id"), nullable=False),
        sa.Column("first", sa.Integer, nullable=False),
    )
    op.create_index("ix_chunk_layers_blob", "chunk_layers", ["blob_id"])
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("head", sa.Integer),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("n_tokens", sa.Integer, nullable=False),
        sa.Column("tokens", sa.LargeBinary, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("label", sa.String(200)),
        sa.Column("pinned", sa.Boolean, nullable=False),
    )
    op.create_index("ix_snapshots_agent", "snapshots", ["agent_id", "id"])
    op.create_table(
        "snapshot_chunks",
        sa.Column("snapshot_id", sa.Integer, sa.ForeignKey("snapshots.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("chunk_key", sa.LargeBinary(16), sa.ForeignKey("chunks.key"), nullable=False),
    )
    op.create_index("ix_snapshot_chunks_chunk", "snapshot_chunks", ["chunk_key"])


def downgrade() -> None:
    for table in ("snapshot_chunks", "snapshots", "agents", "chunk_layers", "chunks", "blobs", "models",
                  "store_meta"):
        op.drop_table(table)
