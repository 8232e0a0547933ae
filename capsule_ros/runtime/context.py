"""Context paired by time: the newest message of an input stamped at or before a trigger.

message_filters' ``Cache`` semantics. Each input keeps its last ``depth`` messages in arrival
order with their stamps (header stamp, or receive time for headerless types). A trigger takes,
per context input, the newest message stamped at or before its own stamp, so which joint state
goes with which image no longer depends on which one DDS delivered first. A message that is
due (stamped before the trigger) but not yet here is waited for, briefly: the wait ends as soon
as the input has something stamped at or after the trigger (inputs arrive in order), or at the
deadline. Thread-safe: callbacks add, the worker reads.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stamped:
    stamp_ns: int
    embeds: Any                  # the message encoded, or checked and encoded when first needed
                                 # (a trigger-only image: ``pipeline.Deferred``)
    number: int                  # arrival number on its input: identifies the message


class ContextCache:
    def __init__(self, depths: dict[str, int]) -> None:
        """``depths``: how many messages each input keeps (bounded memory: embeddings are kept)."""
        self._lock = threading.Lock()
        self._by_input: dict[str, deque[Stamped]] = {name: deque(maxlen=max(1, d))
                                                     for name, d in depths.items()}
        self._count: dict[str, int] = {name: 0 for name in depths}

    def add(self, input_name: str, stamp_ns: int, embeds: Any) -> None:
        with self._lock:
            self._count[input_name] += 1
            self._by_input[input_name].append(Stamped(stamp_ns, embeds, self._count[input_name]))

    def at_or_before(self, input_name: str, stamp_ns: int) -> Stamped | None:
        """The newest message of ``input_name`` stamped at or before ``stamp_ns``."""
        with self._lock:
            best = None
            for item in self._by_input[input_name]:
                if item.stamp_ns <= stamp_ns and (best is None or item.stamp_ns >= best.stamp_ns):
                    best = item
            return best

    def settled(self, input_name: str, stamp_ns: int) -> bool:
        """Can the pairing for ``stamp_ns`` still change? Not once ``input_name`` delivered
        something stamped at or after it (inputs arrive in order), nor when its next message is
        not due yet: its newest stamp plus its period (the shortest recent interval) lies after
        ``stamp_ns``. So a 20 Hz joint state 10 ms older than a frame is not waited for, but
        one that should have come by the frame's stamp is. Nothing received yet: not settled."""
        with self._lock:
            items = self._by_input[input_name]
            if not items:
                return False
            stamps = [item.stamp_ns for item in items]
            newest = max(stamps)
            if newest >= stamp_ns:
                return True
            recent = sorted(stamps)[-8:]
            gaps = [b - a for a, b in zip(recent, recent[1:]) if b > a]
            return bool(gaps) and newest + min(gaps) > stamp_ns

    def held(self) -> dict[str, tuple[int, ...]]:
        """Which messages each input holds (their arrival numbers)."""
        with self._lock:
            return {name: tuple(item.number for item in items)
                    for name, items in self._by_input.items()}
