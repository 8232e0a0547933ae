"""The mechanism's own exceptions. Each says what kind of refusal it is (``reason``); the layers
above map a reason to a status code (``status_codes.capsule_code``), so this package imports
nothing from the node."""
from __future__ import annotations


class CapsuleError(Exception):
    """A capsule operation was refused; nothing was changed."""

    reason = "refused"


class CapsuleFileError(CapsuleError):
    """A capsule file was refused (corrupted, wrong model, bad name) or could not be written."""


class CapsuleNotFound(CapsuleFileError):
    reason = "not_found"


class CapsuleWriteError(CapsuleFileError):
    """A save failed (disk full, permissions); the previous file of that name is intact."""

    reason = "write_failed"


class CapsuleBudgetError(CapsuleError):
    """A capsule does not fit the tier budgets (or nothing could give way); nothing changed."""

    reason = "budget"


class CapsuleNotInMemory(CapsuleError):
    """The capsule sits in the file tier: promote it before reading it."""

    reason = "budget"
