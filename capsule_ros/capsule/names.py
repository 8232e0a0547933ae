"""Stream and capsule names: they become file names, so they are checked in one place."""
from __future__ import annotations

import re

from .errors import CapsuleError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """No separators, no '..', no hidden files; at most 64 characters."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise CapsuleError(f"invalid capsule name {name!r} (letters, digits, '_', '-', '.'; no '..')")
    return name
