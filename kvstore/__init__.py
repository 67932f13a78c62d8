"""kvstore: a persistent, content-addressed KV-cache store for LLM agents on Apple MLX.

    import kvstore
    with kvstore.open() as store:                       # ~/.kvstore, or $KVSTORE_HOME
        fp = kvstore.fingerprint("path/to/model")
        store.save("tech", cache, tokens, model=fp)     # writes only chunks the store lacks
        cache, tokens = store.load("tech", model=fp)    # bit-exact, verified
        cache, n = store.restore(new_tokens, model=fp)  # longest stored prefix, from any agent
"""

from .errors import (AgentExistsError, ArchiveError, BlobError, CorruptBlobError, IncompatibleStoreError,
                     IndexDatabaseError, InvalidNameError, MissingBlobError, ModelMismatchError, NotAStoreError,
                     ReadOnlyStoreError, SchemaTooNewError, StoreError, StoreFullError, StoreLockedError,
                     TokenMismatchError, UnknownAgentError, UnsupportedCacheError)
from .archive import export_agent, import_agent
from .fingerprint import fingerprint
from .formats import DEFAULT_CHUNK_SIZE, FORMAT_VERSION
from .keys import chunk_keys
from .records import AgentInfo, FsckReport, GcReport, Match, Problem, Snapshot, Stats
from .store import Store, default_home, open

__version__ = "0.1.0"

__all__ = [
    "open", "Store", "fingerprint", "chunk_keys", "default_home", "export_agent", "import_agent",
    "Snapshot", "Match", "AgentInfo", "Stats", "FsckReport", "Problem", "GcReport",
    "DEFAULT_CHUNK_SIZE", "FORMAT_VERSION",
    "StoreError", "InvalidNameError", "UnknownAgentError", "AgentExistsError", "ModelMismatchError",
    "BlobError", "CorruptBlobError", "MissingBlobError", "TokenMismatchError", "UnsupportedCacheError",
    "StoreLockedError", "SchemaTooNewError", "NotAStoreError", "IncompatibleStoreError",
    "ReadOnlyStoreError", "StoreFullError", "ArchiveError", "IndexDatabaseError",
]
