"""Where a folder store keeps its index: the one place its file name and SQLite URLs are built."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["INDEX_FILE", "index_path", "sqlite_url", "folder_url", "frozen", "rendered_url", "sqlite_root"]

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


def frozen(root: str | Path, readonly: bool) -> bool:
    """Whether a store opened `readonly` is on read-only media with no WAL left (a clean close): then
    nothing can change the index, and SQLite, which cannot make the WAL's -shm file there, opens it immutable."""
    return readonly and not os.access(root, os.W_OK) and not (Path(root) / f"{INDEX_FILE}-wal").exists()


def folder_url(root: str | Path, readonly: bool) -> str:
    """The URL kvstore.open() opens folder store `root`'s index with."""
    return sqlite_url(root, readonly=readonly, immutable=frozen(root, readonly))


def rendered_url(url: str) -> str:
    """A `sqlite_url` as SQLAlchemy renders it (`Stats.url`), for a path without '?' or '%'.

    Its database part is percent-quoted, the query's keys sorted (sqlalchemy URL.render_as_string):
    a store read without SQLAlchemy (kvstore.index.sqlite_reads) reports the URL a full open reports.
    """
    from urllib.parse import parse_qsl, quote, quote_plus

    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.count("?") > 1 or "%" in url:
        raise ValueError(f"not a folder store's URL: {url}")
    database, _, query = url[len(prefix) :].partition("?")
    shown = prefix + quote(database, safe=" +/")
    if query:
        pairs = sorted(parse_qsl(query), key=lambda kv: kv[0])
        shown += "?" + "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in pairs)
    return shown


def sqlite_root(url: str) -> Path | None:
    """The folder holding the database file of a `sqlite:///` URL (None for any other URL): where such a
    store keeps its blobs and its gc lock unless told otherwise."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]).resolve().parent if url.startswith(prefix) else None
