"""A covering index of chunk_layers: (chunk_key, layer, first) (issue 23, point 5: a turn's save flat in the history).

A save asks which chunks of its chain the index already holds whole: every layer, from the chunk's first
token. The primary key (chunk_key, layer) finds a key's rows but not their `first`; without this index the
question reads each row of the table behind the key, one random page per (chunk, layer) of the chain.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_chunk_layers_first", "chunk_layers", ["chunk_key", "layer", "first"])


def downgrade() -> None:
    op.drop_index("ix_chunk_layers_first", table_name="chunk_layers")
