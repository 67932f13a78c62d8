"""kvstore.server: an OpenAI- and Anthropic-compatible HTTP server whose prompt cache is a kvstore store.

    kvstore serve --model mlx-community/Llama-3.2-1B-Instruct-4bit --port 8080

    from kvstore.server import ServerConfig, create_app, serve
    serve(ServerConfig(model="path/to/model", store="~/.kvstore"))

Every request's prompt is matched against the conversations in memory and in the store (the
longest verified prefix of any conversation of the model); only the rest is prefilled, and the
conversation is saved after each reply, so the cache survives restarts and crashes. Concurrent
requests are generated together, a batched decode step at a time (`--max-concurrency`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore._lazy import lazy_getattr
from kvstore.sizes import parse_size

from .config import ServerConfig

# Loaded on first use (PEP 562): FastAPI and mlx stay out of `kvstore --help` and of ServerConfig users.
_LAZY = {"create_app": ".app", "serve": ".run"}

if TYPE_CHECKING:
    from .app import create_app
    from .run import serve


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = ["ServerConfig", "create_app", "serve", "parse_size"]
