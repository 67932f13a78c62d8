"""The `kvstore` command (click): talk to agents, inspect a store, verify it, collect garbage, move agents.

    kvstore init | chat AGENT MESSAGE [--model M --system S]      # create a store; talk to an agent
    kvstore info | agents | show AGENT | models | du              # read; --json for machine-readable output
    kvstore fsck [--repair] | gc [--dry-run]                      # verify, collect garbage (ask on a terminal)
    kvstore rm AGENT [--dry-run] | fork AGENT NEW                 # change agents
    kvstore export AGENT FILE | import FILE                       # move an agent to another store
    kvstore export-mlx AGENT FILE | import-mlx FILE AGENT --model M   # mlx-lm's prompt-cache files
    kvstore migrate [--status] | demo

--store / --blobs go before or after the command.
"""

from .main import cli, main

__all__ = ["cli", "main"]
