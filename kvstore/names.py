"""Validation of user-supplied names (agents, labels)."""

from __future__ import annotations

import re

from kvstore.errors import InvalidNameError

MAX_NAME_LENGTH = 200
# Letters, digits and a few separators; no leading dot or dash so a name is never a
# path component like ".." or an option like "--all".
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-@:+ ]*")


def validate_name(name: object, what: str = "agent name") -> str:
    """Return `name` if it is a safe name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if not _NAME.fullmatch(name) or name != name.strip() or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name[:60]!r}: use letters, digits, space and _ . - @ : +, "
            "not starting with . or -, and no '..'"
        )
    return name
