"""Capsules: frozen copies of the live state at a committed boundary.

A capsule holds
* the valid KV rows ``[0, position)`` as a chain of *segments*. A commit adds only the rows
  appended since the parent boundary, so a stream's history entries share their common prefix
  (the tensors are shared, never copied again);
* a full copy of every constant-size region (conv and recurrent state);
* metadata: JSON-able values (flags, pending token, step counter) and small named tensors
  (sampler RNG state) — whatever the adapter says the next step reads;
* the journal: the observations appended since the stream's base, so the boundary can be
  recomputed cold (verify mode) or rebuilt on a shorter context (rebase);
* the fingerprint of what it binds to.

Nothing here writes into a capsule after it is made.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .fingerprint import Fingerprint
from .layout import Kind, LiveState, StateLayout

_ids = itertools.count(1)


class CapsuleError(Exception):
    """A capsule operation was refused; nothing was changed."""


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

    def nbytes_by_kind(self, layout: StateLayout) -> dict[str, int]:
        """Bytes this capsule's state holds, by kind (shared KV prefix segments included)."""
        out = {k.value: 0 for k in Kind}
        out[Kind.KV.value] = sum(seg.nbytes for seg in self.kv)
        for spec in layout.specs:
            if spec.kind is not Kind.KV:
                out[spec.kind.value] += spec.row_elems * spec.dtype.itemsize
        out[Kind.META.value] = sum(t.numel() * t.element_size() for t in self.meta_tensors.values())
        return out

    @property
    def nbytes(self) -> int:
        kv = sum(seg.nbytes for seg in self.kv)
        state = sum(t.numel() * t.element_size() for t in self.state.values())
        meta = sum(t.numel() * t.element_size() for t in self.meta_tensors.values())
        return kv + state + meta

    def kv_rows(self, key: str) -> torch.Tensor:
        """The valid KV rows of one region as one tensor (a copy when there are several segments)."""
        parts = [seg.rows[key] for seg in self.kv]
        if not parts:
            raise KeyError(key)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def compacted(self) -> "Capsule":
        """The same capsule with its KV chain merged into one segment (same id)."""
        if len(self.kv) <= 1:
            return self
        keys = list(self.kv[0].rows)
        merged = KVSegment(0, MappingProxyType({k: self.kv_rows(k) for k in keys}))
        return _replace(self, kv=(merged,))


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


def commit(live: LiveState, *, fingerprint: Fingerprint, position: int, meta: Mapping[str, Any],
           meta_tensors: Mapping[str, torch.Tensor] | None = None,
           journal: tuple[JournalEntry, ...] = (), parent: Capsule | None = None,
           max_segments: int = 32) -> Capsule:
    """Freeze the live state at ``position``.

    With a ``parent`` whose rows ``[0, parent.position)`` the live state still holds unchanged
    (the caller's promise: it restored ``parent`` and only appended since), only the new KV rows
    are copied and the parent's segments are shared. Without one, the whole valid range is copied.
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
    capsule = Capsule(fingerprint=fingerprint, position=position, kv=tuple(segments), state=state,
                      meta=_frozen(meta),
                      meta_tensors=_frozen({k: t.clone() for k, t in (meta_tensors or {}).items()}),
                      journal=tuple(journal))
    # Long chains make restore a copy per segment; merge them now and then.
    return capsule.compacted() if len(capsule.kv) > max_segments else capsule


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
