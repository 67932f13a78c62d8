"""Moving caches between kvstore and mlx-lm's own prompt-cache files: import-mlx, export-mlx."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import CliError, StoreRef, pass_store
from .format import count, size


def _model(model: str):
    """--model: `builtin[:ARCH-SIZE]` or a model folder (as a Path: loaded where it is used), else a kvstore
    model name or a Hugging Face id, loaded (a kvstore.agents model handle, with the fingerprint agents use)."""
    from kvstore.agents.model import builtin_dir, is_builtin

    if is_builtin(model):
        return builtin_dir(model)
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    from kvstore.agents import resolve_model

    return resolve_model(model)


def _fingerprint(handle) -> str:
    import kvstore

    return kvstore.fingerprint(handle) if isinstance(handle, Path) else handle.fingerprint


def _mlx_model_name(model: str, handle) -> str:
    """What mlx-lm's --model is to be given for `model`: itself, or the folder of a kvstore model name."""
    from kvstore.models import MODELS

    if model in MODELS or model == "builtin" or model.startswith("builtin:"):
        return str(handle if isinstance(handle, Path) else handle.path)
    return model


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
@click.option(
    "--verify",
    is_flag=True,
    help="Recompute the cache from the token ids with the model and refuse FILE unless it matches; "
    "a verified import is shared with the store's other agents, an unverified one stays private to AGENT.",
)
@pass_store
def import_mlx(ref: StoreRef, file: str, agent: str, model: str, token_spec: str | None, verify: bool) -> None:
    """Save the cache in FILE (from `mlx_lm.cache_prompt` or kvstore export-mlx) as new agent AGENT.

    FILE's layers are checked against the model (layer count, heads, head sizes, dtype, finite values).
    Nothing in a file proves its KV belongs to its token ids: without --verify the import is kept
    private to AGENT, and no other agent's restore ever uses it.
    """
    from kvstore.mlxfile import import_mlx_cache

    tokens = _tokens(token_spec) if token_spec is not None else None
    got = import_mlx_cache(ref.get(create=True), file, agent, model=_model(model), tokens=tokens, verify=verify)
    snap = got.snapshot
    click.echo(
        f"imported {file} as {agent}: {count(snap.n_tokens)} tokens, {size(snap.bytes_written)} written "
        "(chunks the store lacked)"
    )
    if got.verified:
        click.echo(
            f"verified: the model's own prefill of the token ids matches it (largest relative error "
            f"{got.error:.2g}, tolerance {got.tolerance:g}); shared with the store's other agents like any saved cache"
        )
    else:
        click.echo(
            f"not verified: kept private to {agent} (no other agent's restore uses it); "
            "--verify recomputes it with the model to share it"
        )


@click.command("export-mlx")
@click.argument("agent")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option(
    "--model",
    metavar="MODEL",
    help="The model `mlx_lm.generate --model` will be given (`builtin`, a model folder or a Hugging Face id), "
    "checked against AGENT's and written in FILE (default: the name the store records for it).",
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@pass_store
def export_mlx(ref: StoreRef, agent: str, file: str, model: str | None, force: bool) -> None:
    """Write AGENT's head cache to FILE (.safetensors) for `mlx_lm.generate --prompt-cache-file FILE`."""
    from kvstore.mlxfile import export_mlx_cache

    folder = Path(file).expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"cannot write {file}: the folder {folder} does not exist")
    handle = _model(model) if model is not None else None
    n = export_mlx_cache(
        ref.get(),
        agent,
        file,
        model=None if handle is None else _fingerprint(handle),
        mlx_model=None if handle is None else _mlx_model_name(model, handle),
        overwrite=force,
    )
    click.echo(f"exported {agent} to {file}: {count(n)} tokens (its token ids are in the file's metadata)")
    if handle is not None:
        click.echo(f"run: mlx_lm.generate --model {_mlx_model_name(model, handle)} --prompt-cache-file {file} ...")


COMMANDS = [import_mlx, export_mlx]
