"""`kvstore serve`: the OpenAI- and Anthropic-compatible server (imports FastAPI, uvicorn and mlx only when run)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

import click

from .commands_chat import DEFAULT_MODEL
from .context import CliError, StoreRef, pass_store

OFF = ("0", "none", "off")


def _size(ctx, param, value):
    if value is None:
        return None
    if param.name in ("max_disk", "namespace_quota", "max_writes_per_day") and str(value).strip().lower() in OFF:
        return None
    if param.name == "max_disk" and str(value).strip().lower() == "auto":
        return "auto"
    from kvstore.sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _duration(ctx, param, value):
    if value is None or str(value).strip().lower() in OFF:
        return None
    from kvstore.server.config import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    metavar="FOLDER|HF-ID|NAME",
    help="The model: a folder, a Hugging Face id, a name `kvstore models` lists, builtin or builtin:ARCH-SIZE.",
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
    default="auto",
    show_default=True,
    metavar="SIZE|auto|none",
    help="Bytes the store (blobs and index) may hold (500M, 20G); auto: min(30 GiB, a quarter of the free "
    "disk); none or 0: no bound. Anonymous conversations go first, least recently used first.",
)
@click.option(
    "--anon-ttl",
    callback=_duration,
    default="24h",
    show_default=True,
    metavar="DURATION|none",
    help="Anonymous conversations (no X-Kvstore-Agent, prompt_cache_key or user) idle this long are dropped.",
)
@click.option(
    "--namespace-quota",
    callback=_size,
    metavar="SIZE",
    help="Bytes the conversations of one prompt_cache_key (or user) may hold; its oldest go first.",
)
@click.option(
    "--max-writes-per-day",
    callback=_size,
    metavar="SIZE",
    help="Blob bytes written per UTC day; past it caches stay in memory only (warned once).",
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
    "--progress-every",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="A long prefill logs its progress (tokens done, tokens/s, ETA) at most this often.",
)
@click.option(
    "--kv-bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8"]),
    help="Bits for KV cache quantization, as mlx-lm's server (default: full precision). Caches are "
    "stored quantized, apart from full-precision ones.",
)
@click.option("--kv-group-size", default=64, show_default=True, type=click.Choice(["32", "64", "128"]))
@click.option(
    "--quantized-kv-start",
    default=5000,
    show_default=True,
    type=click.IntRange(0),
    help="Token position from which a conversation's KV cache is quantized (with --kv-bits).",
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
    max_disk: int | str | None,
    anon_ttl: float | None,
    namespace_quota: int | None,
    max_writes_per_day: int | None,
    min_free_disk: int,
    max_resident: int,
    max_resident_bytes: int | None,
    max_concurrency: int,
    context_length: int | None,
    keepalive: float,
    progress_every: float,
    kv_bits: str | None,
    kv_group_size: str,
    quantized_kv_start: int,
    log_level: str,
) -> None:
    """Serve a model over the OpenAI and Anthropic APIs, its prompt cache in the store.

    Every request reuses the longest prefix any earlier conversation of the model left in memory
    or in the store, and each reply is saved at once, so the cache survives restarts and crashes.
    Endpoints: /v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /health, /metrics
    (Prometheus), /v1/cache/stats, /v1/cache/lookup, DELETE /v1/cache. The port is taken before the
    model loads: a busy port is a one-line error (exit status 2). Ctrl-C saves, closes and exits 130.
    """
    sock = _bind(host, port)  # seconds before the model would have loaded, and no race with another server
    import kvstore

    kvstore.use_openblas()  # before anything imports mlx
    from kvstore.server import ServerConfig
    from kvstore.server import serve as run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvstore.server").setLevel(log_level.upper())
    model_id = None
    from kvstore.agents.model import builtin_dir, is_builtin

    if is_builtin(model):  # the offline models, as `kvstore chat --model builtin[:ARCH-SIZE]`
        model, model_id = str(builtin_dir(model)), model
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
        anon_ttl=anon_ttl,
        namespace_quota=namespace_quota,
        max_writes_per_day=max_writes_per_day,
        min_free_disk=min_free_disk,
        max_resident=max_resident,
        max_resident_bytes=max_resident_bytes,
        max_concurrency=max_concurrency,
        context_length=context_length,
        keepalive_seconds=keepalive,
        progress_seconds=progress_every,
        kv_bits=None if kv_bits is None else int(kv_bits),
        kv_group_size=int(kv_group_size),
        quantized_kv_start=quantized_kv_start,
    )
    try:
        config.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    status = 0
    try:
        if run(config, log_level=log_level, sock=sock) == signal.SIGINT:
            status = 130  # Ctrl-C, as a shell expects; everything was saved first
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing to save yet
        status = 130
    # Everything is saved and the store is closed. Skip the interpreter's teardown: MLX's per-thread
    # streams (the model ran on its own thread) can abort the process as static objects are destroyed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class PortInUse(CliError):
    """The server's address is taken: a usage problem the user fixes with --port (exit status 2)."""

    exit_code = 2


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, as uvicorn would make it, or a one-line error naming the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
        raise PortInUse(f"port {port} on {host} {why}: stop what listens there or choose another with --port") from None
    sock.set_inheritable(True)
    return sock


COMMANDS = [serve]
