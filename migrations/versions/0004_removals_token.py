"""The removals token (store_meta `removals`): gc, discard_blob and fsck's repairs change it when they remove
layer rows, so a save may trust the chunks it found whole while it is unchanged (issue 23, point 5: a
turn's save flat in the history; kvstore.index.removals).

The revision itself matters as much as the row: an older kvstore refuses an index at a newer revision,
so no gc that leaves the token alone runs on an index whose savers trust it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    store_meta = sa.table("store_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(sa.delete(store_meta).where(store_meta.c.key == "removals"))
    op.bulk_insert(store_meta, [{"key": "removals", "value": uuid.uuid4().hex}])


def downgrade() -> None:
    store_meta = sa.table("store_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(sa.delete(store_meta).where(store_meta.c.key == "removals"))
