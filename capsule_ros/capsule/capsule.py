"""Capsules: frozen copies of the live state at a committed boundary.

A capsule holds
* the valid KV rows ``[0, position)`` as a chain of *segments*. A commit adds only the rows
  appended since the parent boundary, so a stream's history entries share their common prefix
  (the tensors are shared, never copied again);
* a full copy of every constant-size region (conv and recurrent state);
* metadata: JSON-able values (flags, pending token, step counter) and small named tensors
  (sampler RNG state) — whatever the adapter says the next step reads;
* the journal: the latest observations appended before this boundary, contiguous and ending at
  ``position`` -- as many as the caller keeps (none, the last few for a rebase, or all of them
  from the empty state for verify mode);
* the fingerprint of what it binds to.

Nothing here writes into a capsule after it is made. ``snapshot`` makes one from the live state;
``restore`` copies one back.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .errors import CapsuleError
from .fingerprint import Fingerprint
from .layout import Kind, LiveState, StateLayout

_ids = itertools.count(1)
JOURNAL = "journal"   # the byte-count key of the journal, beside the layout's kinds


@dataclass(frozen=True)
class KVSegment:
    """KV rows ``[start, start + n)`` of every KV region."""

    start: int
    rows: Mapping[str, torch.Tensor]

    @property
    def stop(self) -> int:
        return self.start + next(iter(self.rows.values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())


@dataclass(frozen=True)
class JournalEntry:
    """One append, as it went into the model: the embeddings and how they were chunked."""

    embeds: torch.Tensor  # [n, hidden]
    source: str = ""      # e.g. "front_cam+joints"; for reports only

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


@dataclass(frozen=True, eq=False)
class Capsule:
    fingerprint: Fingerprint
    position: int
    kv: tuple[KVSegment, ...]
    state: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any]
    meta_tensors: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))
    journal: tuple[JournalEntry, ...] = ()
    id: int = field(default_factory=lambda: next(_ids))

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes this capsule holds, by kind: kv (shared prefix segments included), state (conv +
        recurrent regions), meta (metadata tensors) and journal."""
        return {Kind.KV.value: sum(seg.nbytes for seg in self.kv),
                "state": sum(_nbytes(t) for t in self.state.values()),
                Kind.META.value: sum(_nbytes(t) for t in self.meta_tensors.values()),
                JOURNAL: sum(e.nbytes for e in self.journal)}

    @property
    def nbytes(self) -> int:
        """Every byte the capsule holds (journal included)."""
        return sum(self.nbytes_by_kind().values())

    def journal_starts(self) -> list[int]:
        """The position each journal entry was appended at (the journal ends at ``position``)."""
        starts, end = [], self.position
        for entry in reversed(self.journal):
            end -= entry.embeds.shape[0]
            starts.append(end)
        return starts[::-1]

    def kv_rows(self, key: str) -> torch.Tensor:
        """The valid KV rows of one region as one tensor (a copy when there are several segments)."""
        parts = [seg.rows[key] for seg in self.kv]
        if not parts:
            raise KeyError(key)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def with_run_merged(self, a: int, b: int, merged: KVSegment) -> "Capsule":
        """The same capsule (same id) with segments ``[a, b)`` replaced by ``merged``, one
        segment holding the same rows."""
        assert merged.start == self.kv[a].start and merged.stop == self.kv[b - 1].stop
        return _replace(self, kv=(*self.kv[:a], merged, *self.kv[b:]))

    def replaced(self, **changes: Any) -> "Capsule":
        """The same capsule (same id) with other tensors for the same bytes (a tier move)."""
        return _replace(self, **changes)


def merge_segments(segments: tuple[KVSegment, ...]) -> KVSegment:
    """One segment holding the rows of a contiguous run of segments."""
    keys = list(segments[0].rows)
    return KVSegment(segments[0].start, MappingProxyType({k: torch.cat([s.rows[k] for s in segments]) for k in keys}))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _replace(capsule: Capsule, **changes: Any) -> Capsule:
    fields = {f: getattr(capsule, f) for f in
              ("fingerprint", "position", "kv", "state", "meta", "meta_tensors", "journal", "id")}
    fields.update(changes)
    return Capsule(**fields)


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


def _clone_rows(live: LiveState, start: int, stop: int) -> KVSegment | None:
    if stop <= start:
        return None
    rows = {k: r[start:stop].clone() for k, r in live.kv_regions().items()}
    return KVSegment(start, _frozen(rows))


def snapshot(live: LiveState, *, fingerprint: Fingerprint, position: int, meta: Mapping[str, Any],
             meta_tensors: Mapping[str, torch.Tensor] | None = None,
             journal: tuple[JournalEntry, ...] = (), parent: Capsule | None = None) -> Capsule:
    """Freeze the live state at ``position`` into a new capsule.

    With a ``parent`` whose rows ``[0, parent.position)`` the live state still holds unchanged
    (the caller's promise: it restored ``parent`` and only appended since), only the new KV rows
    are copied and the parent's segments are shared (a delta). Without one, the whole valid range
    is copied.
    """
    if not 0 <= position <= live.layout.max_len:
        raise CapsuleError(f"position {position} outside [0, {live.layout.max_len}]")
    if parent is not None and parent.position <= position:
        segments = list(parent.kv)
        start = parent.position
    else:
        segments, start = [], 0
    new = _clone_rows(live, start, position)
    if new is not None:
        segments.append(new)
    state = _frozen({k: r.clone() for k, r in live.state_regions().items()})
    return Capsule(fingerprint=fingerprint, position=position, kv=tuple(segments), state=state,
                   meta=_frozen(meta),
                   meta_tensors=_frozen({k: t.clone() for k, t in (meta_tensors or {}).items()}),
                   journal=tuple(journal))


def restore(capsule: Capsule, live: LiveState, expected: Fingerprint) -> None:
    """Copy ``capsule`` into the live buffers, in place (same addresses).

    Refused, with nothing written, when the fingerprint differs. Only the valid KV rows are
    written; rows past ``position`` keep whatever they held, which the model never reads (the
    causal mask hides positions past the query).
    """
    diff = expected.diff(capsule.fingerprint)
    if diff:
        raise CapsuleError("capsule does not match this model: differs in " + ", ".join(diff))
    if capsule.position > live.layout.max_len:
        raise CapsuleError(f"capsule position {capsule.position} exceeds context {live.layout.max_len}")
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for key, region in live.kv_regions().items():
        for seg in capsule.kv:
            dst.append(region[seg.start:seg.stop])
            src.append(seg.rows[key])
    for key, region in live.state_regions().items():
        dst.append(region)
        src.append(capsule.state[key])
    if dst:
        # One multi-tensor launch on CUDA; a plain memcpy per pair on CPU.
        torch._foreach_copy_(dst, src, non_blocking=True)
