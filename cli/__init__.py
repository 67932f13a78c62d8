"""The `kvstore` command (click): inspect a store, verify it, collect garbage, move agents between machines.

    kvstore info | agents | show AGENT | models | du      # read; --json for machine-readable output
    kvstore fsck [--repair] | gc [--dry-run]              # verify, collect garbage
    kvstore rm AGENT | fork AGENT NEW                     # change agents
    kvstore export AGENT FILE | import FILE               # move an agent to another store
    kvstore migrate [--status] | demo
"""

from .main import cli, main

__all__ = ["cli", "main"]
