"""Running the app on uvicorn: Ctrl-C and SIGTERM stop the generation, finish the save and exit."""

from __future__ import annotations

import logging
import socket

from .config import ServerConfig

log = logging.getLogger("kvstore.server")


def serve(config: ServerConfig, log_level: str = "info", sock: socket.socket | None = None) -> int | None:
    """Load the model, open the store and serve until Ctrl-C or SIGTERM; returns the signal that stopped it.

    `sock`: a socket already listening on the address (`kvstore serve` binds it before loading the model).
    """
    import uvicorn

    from .app import create_app
    from .state import ServerState

    config.check()
    state = ServerState(config)
    app = create_app(config, state)

    stopped_by: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop generating at once; the lifespan then saves and closes
            stopped_by.append(sig)
            state.stopping = True
            state.worker.cancel_all()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down (exit status -15); ours is a clean exit, its status
            # chosen by `kvstore serve` from the signal returned: 0 after SIGTERM, 130 after Ctrl-C.
            self._captured_signals.clear()

    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info("listening on http://%s:%d (Ctrl-C to stop)", host, config.port)
    Server(uv).run(sockets=[sock] if sock is not None else None)
    return stopped_by[0] if stopped_by else None
