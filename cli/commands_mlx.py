"""Moving caches between kvstore and mlx-lm's own prompt-cache files: import-mlx, export-mlx."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .format import count, size
from .main import CliError, StoreRef, pass_store


def _fingerprint(model: str) -> str:
    """The fingerprint of --model: `builtin`, a model folder, or a Hugging Face id (loaded to find its files)."""
    import kvstore
    from kvstore.agents.model import builtin_dir, is_builtin

    if is_builtin(model):
        return kvstore.fingerprint(builtin_dir(model))
    if Path(model).expanduser().is_dir():
        return kvstore.fingerprint(Path(model).expanduser())
    from kvstore.agents import resolve_model

    return resolve_model(model).fingerprint


def _tokens(value: str) -> list[int]:
    """--tokens: a JSON file holding a list of token ids, or the ids themselves, comma-separated."""
    try:
        if value.replace(",", "").replace(" ", "").isdigit():
            data = [int(t) for t in value.split(",") if t.strip()]
        else:
            data = json.loads(Path(value).expanduser().read_text())
        if not isinstance(data, list):
            raise ValueError("not a list")
        return [int(t) for t in data]
    except (ValueError, TypeError, OSError) as e:
        raise CliError(
            f"--tokens {value}: expected a JSON file with a list of token ids, or ids separated by commas ({e})"
        ) from None


@click.command("import-mlx")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("agent")
@click.option(
    "--model",
    required=True,
    metavar="MODEL",
    help="The model that made FILE: `builtin`, a model folder or a Hugging Face id.",
)
@click.option(
    "--tokens",
    "token_spec",
    metavar="FILE|IDS",
    help="The token ids the cache has seen (a JSON list in a file, or 1,2,3); needed for files "
    "mlx-lm wrote, which do not record them.",
)
@pass_store
def import_mlx(ref: StoreRef, file: str, agent: str, model: str, token_spec: str | None) -> None:
    """Save the cache in FILE (from `mlx_lm.cache_prompt` or kvstore export-mlx) as AGENT's head."""
    from kvstore.mlxfile import import_mlx_cache

    tokens = _tokens(token_spec) if token_spec is not None else None
    fp = _fingerprint(model)
    snap = import_mlx_cache(ref.get(create=True), file, agent, model=fp, tokens=tokens)
    click.echo(
        f"imported {file} as {agent}: {count(snap.n_tokens)} tokens, {size(snap.bytes_written)} written "
        "(chunks the store lacked)"
    )


@click.command("export-mlx")
@click.argument("agent")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@pass_store
def export_mlx(ref: StoreRef, agent: str, file: str, force: bool) -> None:
    """Write AGENT's head cache to FILE (.safetensors) for `mlx_lm.generate --prompt-cache-file FILE`."""
    from kvstore.mlxfile import export_mlx_cache

    folder = Path(file).expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"cannot write {file}: the folder {folder} does not exist")
    n = export_mlx_cache(ref.get(), agent, file, overwrite=force)
    click.echo(f"exported {agent} to {file}: {count(n)} tokens (its token ids are in the file's metadata)")


COMMANDS = [import_mlx, export_mlx]
