"""What a query ends in: an ``Answer`` (published on ``~/actions`` or ``~/text``) or a ``Failure``
(published on ``~/status``). The ROS layer converts these; nothing here knows ROS."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..status_codes import Code


@dataclass(frozen=True)
class ActionOutput:
    """A continuous head's chunk: ``values`` ``[horizon, dof]``, one row every ``step_period`` s."""

    values: np.ndarray
    step_period: float
    columns: tuple[str, ...] = ()  # the name of each column (joint or axis)
    kind = "continuous"


@dataclass(frozen=True)
class TextOutput:
    """A token head's continuation: the ids sampled after the query, and their text."""

    token_ids: tuple[int, ...]
    text: str
    stop: str                    # "eos" | "max_new_tokens" | "context" (no room left)
    kind = "tokens"


@dataclass
class Answer:
    """One answered query, whatever the stream's head: ``output`` is an ActionOutput or a
    TextOutput. It is made after the commit: ``position`` is a committed boundary."""

    stream: str
    request_id: int
    output: ActionOutput | TextOutput
    position: int                # boundary committed by this query
    stamp_ns: int                # trigger header stamp, or receive time (flagged)
    stamp_is_receive_time: bool
    encode_ms: float
    restore_ms: float
    append_ms: float
    act_ms: float                # head, including every decode step of a token head
    commit_ms: float             # this query's own commit
    fetch_ms: float = 0.0        # waiting for the boundary to come back from a lower tier
    seq: int = 0                 # per-stream answer number: 1, 2, ... with no gap
    dropped: int = 0             # the stream's triggers dropped since its previous answer
    events: list[tuple[Code, str]] = field(default_factory=list)

    # continuous-head shorthands (None for a token head)
    @property
    def actions(self) -> np.ndarray | None:
        return self.output.values if isinstance(self.output, ActionOutput) else None

    @property
    def step_period(self) -> float | None:
        return self.output.step_period if isinstance(self.output, ActionOutput) else None


@dataclass
class Failure:
    stream: str                  # "" when the condition concerns no one stream
    request_id: int              # 0 unless the query was accepted (or the client gave one)
    code: Code
    text: str
    stamp_ns: int = 0            # the trigger's stamp (0: not tied to a message)
    input: str = ""              # the input whose message caused it


Outcome = Answer | Failure
Publish = Callable[[Outcome], None]
