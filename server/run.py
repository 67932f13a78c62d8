"""Running the app on uvicorn: Ctrl-C and SIGTERM stop the generation, finish the save and exit."""

from __future__ import annotations

import logging

from .config import ServerConfig

log = logging.getLogger("kvstore.server")


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Load the model, open the store and serve until Ctrl-C or SIGTERM."""
    import uvicorn

    from .app import create_app
    from .state import ServerState

    config.check()
    state = ServerState(config)
    app = create_app(config, state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop generating at once; the lifespan then saves and closes
            state.worker.cancel_all()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down (exit status -15); ours is a clean exit: status 0.
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
    Server(uv).run()
