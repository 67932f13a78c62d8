"""Format constants recorded in every store and checked when it is opened."""

FORMAT_VERSION = 1  # the blob and key format; bump when keys or blob layout change
HASH_NAME = "xxh3-128"
DEFAULT_CHUNK_SIZE = 256  # MLX's KV allocation step; LMCache and LM Studio use 256 too
BLOB_SUFFIX = ".safetensors"
# The index schema's Alembic head; open() refuses an index stamped with a revision it does not know.
# Here, not in kvstore.index.schema, so read commands check it without importing SQLAlchemy.
SCHEMA_REVISION = "0003"
