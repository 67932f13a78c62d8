"""Where a folder store keeps its index: the one place its file name and SQLite URL are built."""

from __future__ import annotations

from pathlib import Path

__all__ = ["INDEX_FILE", "index_path", "sqlite_url"]

INDEX_FILE = "index.db"


def index_path(root: str | Path) -> Path:
    """The index file of the store folder `root`."""
    return Path(root) / INDEX_FILE


def sqlite_url(root: str | Path, *, readonly: bool = False, immutable: bool = False) -> str:
    """The SQLAlchemy URL of a folder store's index.

    Read-only opens use SQLite's URI form with mode=ro; `immutable` (read-only media with no WAL
    left) also tells SQLite that nothing can change the file, so it needs no -shm file.
    """
    index = index_path(root).resolve()
    if not readonly:
        return f"sqlite:///{index}"
    return f"sqlite:///file:{index}?mode=ro{'&immutable=1' if immutable else ''}&uri=true"
