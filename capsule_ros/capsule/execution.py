"""Capsules across execution paths: refused by default, accepted only when the node says so.

The fingerprint's ``execution`` part names the code path that computed a state ("eager", "graph",
"lean-cuda", "onnxruntime-cpu"). Paths run other kernels, so the same capsule continues with other
numerics on each; a restore across paths is refused unless the node is configured to accept it
(``capsules.accept_other_execution``). Then the model's fingerprint is wrapped in
``AnyExecution``: it still stamps new capsules with this node's own path, and as the expectation
of a restore, load or install it ignores only the ``execution`` part.
"""
from __future__ import annotations

from dataclasses import dataclass

from .fingerprint import Fingerprint, PARTS


@dataclass(frozen=True)
class AnyExecution(Fingerprint):
    """A fingerprint that, as an expectation, accepts a capsule from any execution path."""

    def diff(self, other: Fingerprint) -> list[str]:
        return [p for p in Fingerprint.diff(self, other) if p != "execution"]


def accepting_other_execution(fp: Fingerprint) -> Fingerprint:
    """``fp`` as the expectation of a node that accepts capsules from other execution paths."""
    return AnyExecution(**{p: getattr(fp, p) for p in PARTS})
