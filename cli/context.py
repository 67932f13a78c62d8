"""What the `kvstore` commands share: the store they act on (opened lazily), one-line errors, confirmations.

The commands import this module; `cli.main` imports the commands and builds the group.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

import kvstore
from kvstore.errors import NotAStoreError, StoreError
from kvstore.home import default_home
from kvstore.index.location import index_path, sqlite_root

if TYPE_CHECKING:
    from kvstore.store_reads import StoreReader, StoreReads

__all__ = ["StoreRef", "pass_store", "CliError", "confirm", "yes_option", "missing_store_message"]


class CliError(click.ClickException):
    """A failure the user can act on: one line on stderr, exit status 1, never a traceback."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"kvstore: error: {self.format_message()}", file=file or sys.stderr)


class StoreRef:
    """Where the store is, and the store once a command asks for it (opened at most once).

    Commands that never call `get()` (`--help`, `demo`, `migrate --status` on a missing store)
    never create or open anything.
    """

    def __init__(self, location: str, blobs: str | None, cache_size: str | None = None):
        self.location = location
        self.blobs = blobs
        self.cache_size = cache_size
        self._store: kvstore.Store | None = None
        self._reader: StoreReader | None = None

    @property
    def is_url(self) -> bool:
        return "://" in self.location

    @property
    def root(self) -> Path:
        """The store folder (the blob folder of a URL store)."""
        if self.is_url:
            if self.blobs:
                return Path(self.blobs).expanduser()
            root = sqlite_root(self.location)
            if root is not None:
                return root
            raise click.UsageError("a database URL store needs --blobs PATH (the folder that holds its blobs)")
        return Path(self.location).expanduser()

    def exists(self) -> bool:
        """Whether a store is there (a URL store always counts: its database decides)."""
        return self.is_url or index_path(self.root).is_file()

    def get(self, create: bool = False, chunk_size: int | None = None) -> kvstore.Store:
        """The open store; a missing one is an error unless `create` (import creates its target).

        `chunk_size` applies to a store this call creates; an existing store keeps its own.
        """
        if self._store is None:
            if not self.is_url and not create and not self.exists() and not self.root.is_file():
                raise NotAStoreError(missing_store_message(self.root))
            if self.is_url:
                self.root  # noqa: B018 (raises the usage error for a URL without --blobs)
            try:
                new = create and not self.exists()
                self._store = kvstore.open(
                    self.location,
                    blobs=self.blobs,
                    create=create,
                    chunk_size=chunk_size if new else None,
                    cache_size=self.cache_size or None,
                )
            except StoreError:
                raise
            except Exception as e:  # a malformed URL or a missing database driver, before any data is touched
                if type(e).__module__.startswith("sqlalchemy"):
                    raise CliError(f"cannot open the store {self.location}: {e}") from None
                raise
        return self._store

    def reader(self) -> StoreReads:
        """The store for a command that only reads it (`info`, `agents`, `show`, `models`, `du`).

        A folder store is read through the standard library's sqlite3 (kvstore.store_reads.StoreReader),
        which starts ~0.2 s sooner than importing SQLAlchemy (issue 17) and returns the same records. A URL
        or S3 store, a missing one, or one that a full open would first upgrade or refuse opens in full.
        """
        if self._store is not None:
            return self._store
        if self._reader is None and not self.is_url and not _s3(self.blobs) and self.exists():
            from kvstore.store_reads import StoreReader

            self._reader = StoreReader.open(self.location)
        return self._reader or self.get()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._store is not None:
            self._store.close()
            self._store = None


def _s3(blobs: str | None) -> bool:
    """Whether the blobs are in a bucket (--blobs, or KVSTORE_BLOBS as kvstore.open() reads it)."""
    return (blobs or os.environ.get("KVSTORE_BLOBS") or "").startswith("s3://")


pass_store = click.make_pass_decorator(StoreRef)


def missing_store_message(root: Path) -> str:
    """What to say when a command needs a store that is not there: where we looked and how to make one."""
    shown = str(root)
    home = str(Path.home())
    if shown.startswith(home + os.sep):
        shown = "~" + shown[len(home) :]
    where = "" if root == default_home() else f"--store {shlex.quote(str(root))} "
    return (
        f"no store at {shown}: create one with `kvstore {where}init` (or `kvstore {where}chat AGENT "
        "MESSAGE --model builtin`), or point --store / KVSTORE_HOME at an existing store"
    )


def confirm(prompt: str, yes: bool) -> None:
    """Ask before a destructive change when stdin is a terminal; `--yes` (or a script's stdin) skips it.

    A script cannot answer a prompt, so without a terminal the command goes ahead as written, like `rm`.
    """
    if yes or not sys.stdin.isatty():
        return
    if not click.confirm(prompt, default=False, err=True):
        raise click.exceptions.Exit(1)


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
