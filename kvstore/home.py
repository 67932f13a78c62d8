"""The folder a store lives in when no one names one: $KVSTORE_HOME, else ~/.kvstore.

Light on purpose (no engine, no SQLAlchemy, no MLX): `kvstore --help` shows it as the default.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_home"]


def default_home() -> Path:
    """$KVSTORE_HOME, else ~/.kvstore: where kvstore.open() and the `kvstore` command look first."""
    return Path(os.environ.get("KVSTORE_HOME") or Path.home() / ".kvstore")
