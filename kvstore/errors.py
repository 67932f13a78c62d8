"""The exceptions a caller can act on. Every one is a `StoreError`."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error kvstore raises on purpose."""


class InvalidNameError(StoreError, ValueError):
    """An agent name that is empty, too long, or could play path tricks."""


class UnknownAgentError(StoreError, KeyError):
    """No agent of that name in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown agent"


class AgentExistsError(StoreError):
    """An agent of that name already exists (fork or import target)."""


class ModelMismatchError(StoreError):
    """A cache made by one model was offered to, or asked for by, another."""


class BlobError(StoreError):
    """A blob needed for a restore could not be used."""

    def __init__(self, message: str, blob_id: str, agent: str | None = None):
        super().__init__(message)
        self.blob_id = blob_id
        self.agent = agent


class CorruptBlobError(BlobError):
    """A blob's bytes no longer hash to its name, or do not parse."""


class InvalidBlobIdError(CorruptBlobError, ValueError):
    """A blob id that is not 32 hex digits: no file path is ever built from it."""


class MissingBlobError(BlobError):
    """A blob the index references is not on disk."""


class TokenMismatchError(StoreError):
    """Stored token ids disagree with the ones the cache claims to hold."""


class UnsupportedCacheError(StoreError, TypeError):
    """A cache class the codec does not know; it is refused, never pickled."""


class StoreLockedError(StoreError):
    """The store stayed locked by another writer past the timeout."""


class SchemaTooNewError(StoreError):
    """The index was written by a newer kvstore than this one."""


class NotAStoreError(StoreError):
    """A path that exists but is not a kvstore store."""


class IncompatibleStoreError(StoreError):
    """A store whose settings (chunk size, hash, format) this code cannot use."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store that cannot be written."""


class StoreFullError(StoreError, OSError):
    """The disk is full; nothing was committed."""


class ArchiveError(StoreError):
    """An export archive that is malformed or fails verification."""


class IndexDatabaseError(StoreError):
    """The index database failed in a way the caller cannot fix by retrying."""


class BlobServiceError(StoreError):
    """The object storage that holds the blobs failed a request (after its retries): nothing was committed."""


class StoreAccessDeniedError(BlobServiceError):
    """The object storage refused the credentials (or the bucket's policy denies them)."""


class NoSuchBucketError(BlobServiceError):
    """The bucket an s3:// URL names does not exist."""


class WindowNotCapturedWarning(UserWarning):
    """A sliding-window cache was saved without the chunks that already left its window.

    Its snapshot restores whole, and a longer request restores it at exactly its length; no earlier
    chunk boundary can be rebuilt from it (capture chunks during prefill: `kvstore.cache.capture`).
    """


__all__ = [
    "StoreError",
    "WindowNotCapturedWarning",
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
    "BlobServiceError",
    "StoreAccessDeniedError",
    "NoSuchBucketError",
]
