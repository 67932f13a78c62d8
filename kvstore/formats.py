"""Format constants recorded in every store and checked when it is opened."""

FORMAT_VERSION = 1  # the blob and key format; bump when keys or blob layout change
HASH_NAME = "xxh3-128"
DEFAULT_CHUNK_SIZE = 256  # MLX's KV allocation step; LMCache and LM Studio use 256 too
BLOB_SUFFIX = ".safetensors"
# The index schema's Alembic head; open() refuses an index stamped with a revision it does not know.
# Here, not in kvstore.index.schema, so read commands check it without importing SQLAlchemy.
SCHEMA_REVISION = "0005"
MAX_CHUNK_SIZE = 1 << 20


def new_chunk_size(chunk_size: int | None) -> int:
    """The chunk size a new store records: `chunk_size` (a positive integer up to MAX_CHUNK_SIZE), else the default."""
    size = chunk_size or DEFAULT_CHUNK_SIZE
    if not isinstance(size, int) or size < 1 or size > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be a positive integer, not {size!r}")
    return size
