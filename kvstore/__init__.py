"""kvstore: a persistent, content-addressed KV-cache store for LLM agents on Apple MLX.

    import kvstore
    with kvstore.open() as store:                       # ~/.kvstore, or $KVSTORE_HOME
        fp = kvstore.fingerprint("path/to/model")
        store.save("tech", cache, tokens, model=fp)     # writes only chunks the store lacks
        cache, tokens = store.load("tech", model=fp)    # bit-exact, verified
        cache, n = store.restore(new_tokens, model=fp)  # longest stored prefix, from any agent
    text, cache, tokens = kvstore.generate(model, tokenizer, prompt)   # mlx-lm generation, keeping the cache

Importing kvstore is cheap: the engine (and with it mlx and mlx-lm) loads on first use of a name
below, so the command line starts fast and `kvstore.use_openblas()` can still run before mlx does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore._lazy import lazy_getattr
from kvstore.blas import use_openblas
from kvstore.errors import (
    AgentExistsError,
    ArchiveError,
    BlobError,
    CorruptBlobError,
    IncompatibleStoreError,
    IndexDatabaseError,
    InvalidNameError,
    MissingBlobError,
    ModelMismatchError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaTooNewError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    TokenMismatchError,
    UnknownAgentError,
    UnsupportedCacheError,
    WindowNotCapturedWarning,
)
from kvstore.formats import DEFAULT_CHUNK_SIZE, FORMAT_VERSION
from kvstore.records import AgentBytes, AgentInfo, FsckReport, GcReport, Match, Problem, Snapshot, Stats

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562)
_LAZY = {
    "open": ".store",
    "Store": ".store",
    "default_home": ".home",
    "export_agent": ".ops.archive",
    "import_agent": ".ops.archive",
    "fingerprint": ".cache.fingerprint",
    "chunk_keys": ".cache.keys",
    "generate": ".generation",
    "Generation": ".generation",
    "cache_tokens": ".cache.leaves",
    "cache_nbytes": ".cache.leaves",
    "check_cache": ".generation",
    "import_mlx_cache": ".mlxfile",
    "export_mlx_cache": ".mlxfile",
}

if TYPE_CHECKING:
    from kvstore.cache.fingerprint import fingerprint
    from kvstore.cache.keys import chunk_keys
    from kvstore.cache.leaves import cache_nbytes, cache_tokens
    from kvstore.generation import Generation, check_cache, generate
    from kvstore.home import default_home
    from kvstore.mlxfile import export_mlx_cache, import_mlx_cache
    from kvstore.ops.archive import export_agent, import_agent
    from kvstore.store import Store, open


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = [
    "open",
    "Store",
    "fingerprint",
    "chunk_keys",
    "default_home",
    "export_agent",
    "import_agent",
    "use_openblas",
    "generate",
    "Generation",
    "cache_tokens",
    "cache_nbytes",
    "check_cache",
    "import_mlx_cache",
    "export_mlx_cache",
    "Snapshot",
    "Match",
    "AgentInfo",
    "AgentBytes",
    "Stats",
    "FsckReport",
    "Problem",
    "GcReport",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "StoreError",
    "InvalidNameError",
    "UnknownAgentError",
    "AgentExistsError",
    "ModelMismatchError",
    "BlobError",
    "CorruptBlobError",
    "MissingBlobError",
    "TokenMismatchError",
    "UnsupportedCacheError",
    "StoreLockedError",
    "SchemaTooNewError",
    "NotAStoreError",
    "IncompatibleStoreError",
    "ReadOnlyStoreError",
    "StoreFullError",
    "ArchiveError",
    "IndexDatabaseError",
    "WindowNotCapturedWarning",
]
