"""Reliability-suite fixtures: the kill count (`--long`) and the figures file written at the end."""

from __future__ import annotations

import pytest

from . import report


@pytest.fixture(scope="session")
def kills(request) -> int:
    """Crash-harness kills: 200 by default, 2,000 with `pytest --long`."""
    return 2000 if request.config.getoption("--long", default=False) else 200


@pytest.fixture(scope="session", autouse=True)
def _figures():
    yield
    path = report.write()
    if path is not None:
        print(f"\nreliability figures written to {path}")
