"""`kvstore serve`: the OpenAI- and Anthropic-compatible server (imports FastAPI, uvicorn and mlx only when run)."""

from __future__ import annotations

import logging
import os
import sys

import click

from .main import StoreRef, pass_store


def _size(ctx, param, value):
    if value is None:
        return None
    from kvstore.server.config import parse_size  # kvstore.server.config imports nothing heavy

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option(
    "--model",
    required=True,
    metavar="FOLDER|HF-ID|NAME",
    help="The model: a folder, a Hugging Face id, smollm2-135m-instruct or builtin.",
)
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    metavar="NAME",
    help="Another name requests may give as their model (repeatable), e.g. one a client has built in.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (off loopback needs --api-key).")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--api-key",
    envvar="KVSTORE_API_KEY",
    metavar="KEY",
    help="Required as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (env KVSTORE_API_KEY).",
)
@click.option(
    "--max-disk",
    callback=_size,
    metavar="SIZE",
    help="Blob bytes the store may hold (500M, 20G): least recently used conversations go first.",
)
@click.option(
    "--min-free-disk",
    callback=_size,
    default="1G",
    show_default=True,
    metavar="SIZE",
    help="Below this much free disk the server stops writing caches (and keeps serving).",
)
@click.option(
    "--max-resident",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Conversations whose caches stay in memory.",
)
@click.option("--max-resident-bytes", callback=_size, metavar="SIZE", help="Bytes the caches in memory may take.")
@click.option(
    "--max-concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Requests generated together (one batched decode step); more wait in arrival order.",
)
@click.option("--context-length", type=click.IntRange(1), help="Longest prompt accepted (default: the model's).")
@click.option(
    "--keepalive",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    metavar="SECONDS",
    help="A waiting streaming response sends a keep-alive this often.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@pass_store
def serve(
    ref: StoreRef,
    model: str,
    aliases: tuple[str, ...],
    host: str,
    port: int,
    api_key: str | None,
    max_disk: int | None,
    min_free_disk: int,
    max_resident: int,
    max_resident_bytes: int | None,
    max_concurrency: int,
    context_length: int | None,
    keepalive: float,
    log_level: str,
) -> None:
    """Serve a model over the OpenAI and Anthropic APIs, its prompt cache in the store.

    Every request reuses the longest prefix any earlier conversation of the model left in memory
    or in the store, and each reply is saved at once, so the cache survives restarts and crashes.
    Endpoints: /v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /health,
    /v1/cache/stats, /v1/cache/lookup, DELETE /v1/cache.
    """
    import kvstore

    kvstore.use_openblas()  # before anything imports mlx
    from kvstore.server import ServerConfig
    from kvstore.server import serve as run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvstore.server").setLevel(log_level.upper())
    model_id = None
    if model == "builtin":  # the offline model, as `kvstore chat --model builtin`
        from kvstore.builtin_models import builtin_model_path

        model, model_id = str(builtin_model_path()), "builtin"
    config = ServerConfig(
        model=model,
        model_id=model_id,
        aliases=aliases,
        store=ref.location,
        blobs=ref.blobs,
        host=host,
        port=port,
        api_key=api_key,
        max_disk=max_disk,
        min_free_disk=min_free_disk,
        max_resident=max_resident,
        max_resident_bytes=max_resident_bytes,
        max_concurrency=max_concurrency,
        context_length=context_length,
        keepalive_seconds=keepalive,
    )
    try:
        config.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    run(config, log_level=log_level)
    # Everything is saved and the store is closed. Skip the interpreter's teardown: MLX's per-thread
    # streams (the model ran on its own thread) can abort the process as static objects are destroyed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


COMMANDS = [serve]
