"""The `kvstore` command: a click group with a lazily opened store and one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

import kvstore
from kvstore.errors import NotAStoreError, StoreError

__all__ = ["cli", "main", "StoreRef", "pass_store", "CliError"]

INDEX_FILE = "index.db"


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

    def __init__(self, location: str, blobs: str | None):
        self.location = location
        self.blobs = blobs
        self._store: kvstore.Store | None = None

    @property
    def is_url(self) -> bool:
        return "://" in self.location

    @property
    def root(self) -> Path:
        """The store folder (the blob folder of a URL store)."""
        if self.is_url:
            if self.blobs:
                return Path(self.blobs).expanduser()
            if self.location.startswith("sqlite:///"):
                return Path(self.location[len("sqlite:///"):]).expanduser().resolve().parent
            raise click.UsageError("a database URL store needs --blobs PATH (the folder that holds its blobs)")
        return Path(self.location).expanduser()

    def exists(self) -> bool:
        """Whether a store is there (a URL store always counts: its database decides)."""
        return self.is_url or (self.root / INDEX_FILE).is_file()

    def get(self, create: bool = False, chunk_size: int | None = None) -> kvstore.Store:
        """The open store; a missing one is an error unless `create` (import creates its target).

        `chunk_size` applies to a store this call creates; an existing store keeps its own.
        """
        if self._store is None:
            if not self.is_url and not create and not self.exists() and not self.root.is_file():
                raise NotAStoreError(f"no store at {self.root} (set --store or KVSTORE_HOME, or create one with "
                                     "`kvstore import` or the Python API)")
            if self.is_url:
                self.root  # noqa: B018 (raises the usage error for a URL without --blobs)
            try:
                new = create and not self.exists()
                self._store = kvstore.open(self.location, blobs=self.blobs, create=create,
                                           chunk_size=chunk_size if new else None)
            except StoreError:
                raise
            except Exception as e:  # a malformed URL or a missing database driver, before any data is touched
                if type(e).__module__.startswith("sqlalchemy"):
                    raise CliError(f"cannot open the store {self.location}: {e}") from None
                raise
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_store = click.make_pass_decorator(StoreRef)


class KvstoreGroup(click.Group):
    """A group that turns the engine's errors into one line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except StoreError as e:
            raise CliError(str(e)) from None
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise CliError(f"{e.strerror or e}{where}") from None
        except ValueError as e:
            raise CliError(str(e)) from None


@click.group(cls=KvstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "location", envvar="KVSTORE_HOME", default=lambda: str(kvstore.default_home()),
              show_default="$KVSTORE_HOME or ~/.kvstore", metavar="PATH|URL",
              help="The store: a folder, or a database URL such as postgresql+psycopg://host/db.")
@click.option("--blobs", envvar="KVSTORE_BLOBS", type=click.Path(file_okay=False), metavar="PATH",
              help="The blob folder of a database-URL store (env KVSTORE_BLOBS).")
@click.version_option(kvstore.__version__, "--version", prog_name="kvstore")
@click.pass_context
def cli(ctx: click.Context, location: str, blobs: str | None) -> None:
    """Inspect, verify, clean and move the agents of a kvstore store (persistent KV caches for mlx-lm).

    Read commands take --json for machine-readable output. Exit status: 0 ok, 1 error (or fsck
    problems), 2 usage error.
    """
    ref = StoreRef(os.fspath(location), blobs)
    ctx.obj = ref
    ctx.call_on_close(ref.close)


def _register() -> None:
    from . import commands_agents, commands_inspect, commands_maintain

    for module in (commands_inspect, commands_maintain, commands_agents):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="kvstore")


if __name__ == "__main__":
    main()
