"""The index tables (SQLAlchemy Core). Alembic's revisions in `kvstore.migrations` build the same schema."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from kvstore.formats import SCHEMA_REVISION  # noqa: F401 (schema.SCHEMA_REVISION: the head these tables are)

metadata = MetaData()

store_meta = Table(
    "store_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", String(32), nullable=False, unique=True),
    Column("name", Text),  # a human hint (model path or id); never trusted for identity
    Column("layout", Text),  # JSON: the cache classes and their parameters, per layer
    Column("created", Float, nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("id", String(32), primary_key=True),  # xxh3-128 of the file's bytes
    Column("nbytes", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
)

chunks = Table(
    "chunks",
    metadata,
    Column("key", LargeBinary(16), primary_key=True),  # K_i of the hash chain: names the chunk given its prefix
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("seq", Integer, nullable=False),  # chunk index: it starts at seq * chunk_size
    Column("length", Integer, nullable=False),  # tokens in the chunk (< chunk_size for a tail)
    # K_{i-1} (the fingerprint for chunk 0): key = H(parent || tokens). Lets match() find a stored
    # partial tail chunk that a longer request's own chunking cannot name.
    Column("parent", LargeBinary(16)),
    # Bytes of the distinct blobs this chunk's layer rows name, and that plus its parent's prefix_bytes:
    # kept by every writer (kvstore.index.sizes) so accounting reads them instead of summing blobs.
    Column("nbytes", BigInteger, nullable=False, server_default="0"),
    Column("prefix_bytes", BigInteger, nullable=False, server_default="0"),
    Index("ix_chunks_parent", "parent"),
)

chunk_layers = Table(
    "chunk_layers",
    metadata,
    Column("chunk_key", LargeBinary(16), ForeignKey("chunks.key", ondelete="CASCADE"), primary_key=True),
    Column("layer", Integer, primary_key=True),  # slot: the leaf cache's place in the model's layout
    Column("blob_id", String(32), ForeignKey("blobs.id"), nullable=False),
    # Leading tokens of the chunk the blob lacks: a sliding-window layer may only hold a chunk's tail.
    Column("first", Integer, nullable=False, default=0),
    Index("ix_chunk_layers_blob", "blob_id"),
    # Covering: which chunks of a chain are held whole, without reading the table (kvstore.index.layers).
    Index("ix_chunk_layers_first", "chunk_key", "layer", "first"),
)

agents = Table(
    "agents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("meta", Text, nullable=False, default="{}"),  # JSON: role, messages, caller's metadata
    Column("head", Integer),  # snapshots.id of the newest snapshot
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("agent_id", Integer, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("n_tokens", Integer, nullable=False),
    Column("tokens", LargeBinary, nullable=False),  # little-endian uint32: verified on every load
    Column("created", Float, nullable=False),
    Column("label", String(200)),
    Column("pinned", Boolean, nullable=False, default=False),
    Index("ix_snapshots_agent", "agent_id", "id"),
)

snapshot_chunks = Table(
    "snapshot_chunks",
    metadata,
    Column("snapshot_id", Integer, ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    # No foreign key to chunks (revision 0005): with no index by chunk, each chunk gc deletes would make
    # the database scan this table for rows naming it. gc deletes only chunks no agent_chunks row names.
    Column("chunk_key", LargeBinary(16), nullable=False),
)

# Which agents' snapshots list a chunk: the lookups by chunk (gc's reachability, sharing, a match's token
# check) read this instead of an index of snapshot_chunks by chunk. A turn's save late in a chat lists
# every chunk of its history again; an index of those rows took a write on a page of its own for each
# (issue 23, point 5), where this gets rows only for the chunks new to the agent. Kept by every writer
# of snapshot_chunks (kvstore.index.queries) and by gc's retention; checked and rebuilt by fsck.
agent_chunks = Table(
    "agent_chunks",
    metadata,
    Column("chunk_key", LargeBinary(16), ForeignKey("chunks.key"), primary_key=True),
    Column("agent_id", Integer, ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_agent_chunks_agent", "agent_id"),
    sqlite_with_rowid=False,
)
