"""Numeric status codes shared by the engine, the policy layer and the ROS node.

They mirror the constants of ``msg/Status.msg`` one for one (a test parses that file and compares),
so a code raised deep in an encoder can be published on ``~/status`` unchanged. Codes are grouped
by hundreds: 1xx bad input, 2xx routing, 3xx context policy, 4xx capsules, 5xx actuation, 9xx bugs.
This module imports nothing from ROS.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    OK = 0
    BAD_ENCODING = 100      # image encoding not supported
    BAD_SIZE = 101          # size / step / data length mismatch, wrong array length
    NON_FINITE = 102        # NaN or Inf in the input
    MISSING_JOINT = 103     # a configured joint is absent from JointState
    BAD_INPUT = 104         # other malformed input
    UNKNOWN_STREAM = 200    # query for a stream that is not configured
    NO_OBSERVATION = 201    # query before the stream has anything to append
    DROPPED = 202           # an explicit query superseded, overflowed or stale before it ran
    CONTEXT_FULL = 300      # context limit reached, policy 'refuse'
    CONTEXT_RESET = 301     # context limit reached, stream reset to its base (warning)
    CONTEXT_REBASED = 302   # context limit reached, stream rebased on its latest observations
    CAPSULE_REFUSED = 400   # restore/load refused: fingerprint, checksum, version, name
    CAPSULE_NOT_FOUND = 401
    CAPSULE_BUDGET = 402    # capsule larger than any tier budget
    CAPSULE_EVICTED = 403   # informational: a capsule moved tier or was dropped
    VERIFY_MISMATCH = 404   # verify mode: a cold recompute of a boundary differs from it
    ACTION_CLAMPED = 500
    ACTION_DROPPED = 501
    STALE_OBSERVATION = 502
    RATE_LIMITED = 503
    INTERNAL = 900


# The capsule mechanism's refusals (``CapsuleError.reason``) and the codes they are published with.
CAPSULE_REASONS = {"refused": Code.CAPSULE_REFUSED, "not_found": Code.CAPSULE_NOT_FOUND,
                   "budget": Code.CAPSULE_BUDGET, "write_failed": Code.CAPSULE_REFUSED}


def capsule_code(reason: str) -> Code:
    """The status code of a capsule error's ``reason`` (unknown reasons: refused)."""
    return CAPSULE_REASONS.get(reason, Code.CAPSULE_REFUSED)


class CapsuleRosError(Exception):
    """An error a client must see, carrying the ``Status`` code to publish with it."""

    def __init__(self, code: Code, text: str) -> None:
        super().__init__(f"{code.name}: {text}")
        self.code = Code(code)
        self.text = text
