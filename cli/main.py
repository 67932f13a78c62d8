"""The `kvstore` command: a click group with a lazily opened store and one-line errors."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

import kvstore
from kvstore.errors import NotAStoreError, StoreError
from kvstore.index.location import index_path

if TYPE_CHECKING:
    from kvstore.store_reads import StoreReader, StoreReads

__all__ = ["cli", "main", "StoreRef", "pass_store", "CliError", "confirm", "yes_option"]


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
            if self.location.startswith("sqlite:///"):
                return Path(self.location[len("sqlite:///") :]).expanduser().resolve().parent
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
    where = "" if root == Path(kvstore_home()) else f"--store {shlex.quote(str(root))} "
    return (
        f"no store at {shown}: create one with `kvstore {where}init` (or `kvstore {where}chat AGENT "
        "MESSAGE --model builtin`), or point --store / KVSTORE_HOME at an existing store"
    )


def kvstore_home() -> str:
    """$KVSTORE_HOME or ~/.kvstore, as kvstore.open() uses it (without importing the engine for --help)."""
    return os.environ.get("KVSTORE_HOME") or str(Path.home() / ".kvstore")


def confirm(prompt: str, yes: bool) -> None:
    """Ask before a destructive change when stdin is a terminal; `--yes` (or a script's stdin) skips it.

    A script cannot answer a prompt, so without a terminal the command goes ahead as written, like `rm`.
    """
    if yes or not sys.stdin.isatty():
        return
    if not click.confirm(prompt, default=False, err=True):
        raise click.exceptions.Exit(1)


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")


# The group's own options; they may also come after the subcommand (`kvstore info --store X`).
GLOBAL_OPTIONS = ("--store", "--blobs", "--cache-size")


def hoist_global_options(args: list[str], commands: Mapping[str, click.Command]) -> list[str]:
    """Move `--store X` / `--blobs=X` found after the subcommand's name to before it.

    Stops at `--`; leaves an option alone when the subcommand has one of the same name.
    """
    i = 0
    while i < len(args) and args[i].startswith("-"):  # the group's own options, before the subcommand
        i += 2 if args[i] in GLOBAL_OPTIONS else 1
    if i >= len(args) or args[i] not in commands:
        return args
    own = {opt for p in commands[args[i]].params for opt in getattr(p, "opts", ())}
    head, tail, moved = args[:i], [args[i]], []
    rest = args[i + 1 :]
    j = 0
    while j < len(rest):
        word = rest[j]
        if word == "--":
            tail += rest[j:]
            break
        name = word.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and name not in own:
            if "=" in word:
                moved.append(word)
                j += 1
            else:
                moved += rest[j : j + 2]
                j += 2
            continue
        tail.append(word)
        j += 1
    return head + moved + tail


class KvstoreGroup(click.Group):
    """A group that takes its options anywhere and turns the engine's errors into one line and exit status 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(list(args), self.commands))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.Abort as e:
            if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C at a confirmation prompt
                click.echo(err=True)
                raise click.exceptions.Exit(130) from None
            raise
        except (click.ClickException, click.exceptions.Exit):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT, no traceback, no "Aborted!"
            click.echo(err=True)
            raise click.exceptions.Exit(130) from None
        except StoreError as e:
            raise CliError(str(e)) from None
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise CliError(f"{e.strerror or e}{where}") from None
        except ValueError as e:
            raise CliError(str(e)) from None


@click.group(cls=KvstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "location",
    envvar="KVSTORE_HOME",
    default=kvstore_home,
    show_default="$KVSTORE_HOME or ~/.kvstore",
    metavar="PATH|URL",
    help="The store: a folder, or a database URL such as postgresql+psycopg://host/db.",
)
@click.option(
    "--blobs",
    envvar="KVSTORE_BLOBS",
    type=click.Path(file_okay=False),
    metavar="PATH|S3URL",
    help="The blob folder of a database-URL store, or an S3 bucket: "
    "s3://bucket/prefix?endpoint=http://host:port (credentials: the AWS variables or a profile; "
    "env KVSTORE_BLOBS).",
)
@click.option(
    "--cache-size",
    envvar="KVSTORE_CACHE_SIZE",
    metavar="SIZE",
    help="An S3 store's local disk tier budget, e.g. 10G or 512M (default 10G; env KVSTORE_CACHE_SIZE).",
)
@click.version_option(kvstore.__version__, "--version", prog_name="kvstore")
@click.pass_context
def cli(ctx: click.Context, location: str, blobs: str | None, cache_size: str | None) -> None:
    """Talk to, inspect, verify, clean and move the agents of a kvstore store (persistent KV caches for mlx-lm).

    --store, --blobs and --cache-size go before or after the command. Read commands take --json for machine-readable
    output. Exit status: 0 ok, 1 error (or fsck problems), 2 usage error.
    """
    ref = StoreRef(os.fspath(location), blobs, cache_size)
    ctx.obj = ref
    ctx.call_on_close(ref.close)


def _register() -> None:
    from . import (
        commands_agents,
        commands_chat,
        commands_explain,
        commands_inspect,
        commands_maintain,
        commands_mlx,
        commands_models,
        commands_serve,
    )

    for module in (
        commands_inspect,
        commands_models,
        commands_explain,
        commands_maintain,
        commands_agents,
        commands_chat,
        commands_mlx,
        commands_serve,
    ):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="kvstore")


if __name__ == "__main__":
    main()
