"""The `kvstore` command: the click group (options anywhere, one-line errors) and its commands (cli/commands_*.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import click

import kvstore
from kvstore.errors import StoreError
from kvstore.home import default_home

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
from .context import CliError, StoreRef

__all__ = ["cli", "main"]


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
    default=lambda: os.fspath(default_home()),
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


for _module in (
    commands_inspect,
    commands_models,
    commands_explain,
    commands_maintain,
    commands_agents,
    commands_chat,
    commands_mlx,
    commands_serve,
):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="kvstore")


if __name__ == "__main__":
    main()
