"""Names a package exports but imports on first use (PEP 562): the one lazy loader of kvstore and kvstore.server."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str], namespace: MutableMapping[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `table[name]` (a module, relative to the package) on
    the first access to `name` and keeps the value in `namespace` (the package's globals()), so it runs once."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__
