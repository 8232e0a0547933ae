"""Verify mode and proofs: compare capsules (and the live state) buffer by buffer.

``compare_capsules`` is what the engine's verify mode runs after recomputing a boundary cold from
its journal; ``live_mismatches`` checks that the live buffers hold a capsule byte for byte (the
restore proof); ``greedy`` runs a greedy continuation straight on the model (no engine), which the
proof tests use for cold references and for deliberately incomplete restores (negative controls).
Imports no ROS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..capsule import Capsule
from ..capsule.layout import Kind, LiveState, StateLayout, region_key


@dataclass
class Divergence:
    """The first element where a committed capsule and its cold recompute differ."""

    buffer: str          # layout buffer name ("L3.rec0"), or "meta.<key>"
    index: int | None    # flat index into the buffer's valid part, in the model's view shape
    committed: Any
    cold: Any


@dataclass
class VerifyReport:
    stream: str = ""
    ok: bool = True
    position: int = 0
    commits: int = 0
    buffers: int = 0                 # buffers compared
    first: Divergence | None = None  # None when ok
    mismatched: list[str] = field(default_factory=list)  # every buffer that differs
    max_abs: float = 0.0
    ms: float = 0.0
    error: str | None = None          # verify itself failed to run

    def text(self) -> str:
        if self.error:
            return f"stream {self.stream!r}: verify failed to run: {self.error}"
        if self.ok:
            return f"stream {self.stream!r} at {self.position}: {self.buffers} buffers match"
        d = self.first
        return (f"stream {self.stream!r} at {self.position}: first divergence in {d.buffer} "
                f"at flat index {d.index}: committed {d.committed!r} vs cold {d.cold!r} "
                f"({len(self.mismatched)} buffers differ, max |diff| {self.max_abs:.3g})")


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _valid_view(layout, spec, region_rows: torch.Tensor, offset: int, position: int) -> torch.Tensor:
    """One named buffer's valid part, in the model's shape, from a region (KV rows or flat state)."""
    n = spec.row_elems
    if spec.seq_axis is None:
        return region_rows[offset:offset + n].view(spec.shape)
    others = [s for i, s in enumerate(spec.shape) if i != spec.seq_axis]
    stored = region_rows[:position, offset:offset + n].reshape(position, *others)
    order = list(range(1, len(spec.shape)))
    order.insert(spec.seq_axis, 0)
    return stored.permute(*order).contiguous()


def compare_capsules(layout, committed: Capsule, cold: Capsule, atol: float = 0.0) -> VerifyReport:
    """Compare two capsules of one layout buffer by buffer; bit-exact unless ``atol`` > 0."""
    report = VerifyReport()
    for key in sorted(set(committed.meta) | set(cold.meta)):
        a, b = committed.meta.get(key), cold.meta.get(key)
        report.buffers += 1
        if a != b:
            report.mismatched.append(f"meta.{key}")
            if report.first is None:
                idx = None
                if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                    idx = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                report.first = Divergence(f"meta.{key}", idx, a, b)
    position = min(committed.position, cold.position)
    offsets: dict[str, int] = {}
    regions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in layout.specs:
        kv = spec.kind is Kind.KV
        key = region_key(kv, spec.dtype)
        if key not in regions:
            if kv:
                get = (lambda c: c.kv_rows(key) if c.kv else None)
                ra, rb = get(committed), get(cold)
                if ra is None or rb is None:  # an empty boundary has no KV rows
                    width = sum(s.row_elems for s in layout.specs if s.kind is Kind.KV and s.dtype == spec.dtype)
                    empty = torch.empty(0, width, dtype=spec.dtype)
                    ra = empty if ra is None else ra
                    rb = empty if rb is None else rb
            else:
                ra, rb = committed.state[key], cold.state[key]
            regions[key] = (ra, rb)
        ra, rb = regions[key]
        off = offsets.get(key, 0)
        offsets[key] = off + spec.row_elems
        a = _valid_view(layout, spec, ra, off, position).reshape(-1)
        b = _valid_view(layout, spec, rb, off, position).reshape(-1)
        report.buffers += 1
        if atol > 0:
            diff = ~torch.isclose(a.float(), b.float(), rtol=0.0, atol=atol, equal_nan=True)
        else:
            bits = _BITS[a.element_size()]
            diff = a.view(bits) != b.view(bits)
        if bool(diff.any()):
            report.mismatched.append(spec.name)
            d = (a.float() - b.float()).abs()
            report.max_abs = max(report.max_abs, float(torch.nan_to_num(d, nan=float("inf")).max()))
            if report.first is None:
                i = int(diff.nonzero()[0, 0])
                report.first = Divergence(spec.name, i, a[i].item(), b[i].item())
    report.ok = report.first is None
    return report


def live_mismatches(live: LiveState, capsule: Capsule, meta: dict | None = None) -> list[str]:
    """Names of what differs, byte for byte, between the live buffers and ``capsule``: every
    named buffer's valid part (KV rows [0, position), all conv/recurrent state) and, given the
    live ``meta`` (``model.read_meta()``), the metadata. Empty when the live state holds it."""
    live_caps = _LiveAsCapsule(live, capsule.position, meta if meta is not None else dict(capsule.meta))
    report = compare_capsules(live.layout, capsule, live_caps)  # type: ignore[arg-type]
    return report.mismatched


class _LiveAsCapsule:
    """The live state seen through the few attributes ``compare_capsules`` reads (no copy)."""

    def __init__(self, live: LiveState, position: int, meta: dict) -> None:
        self.position = position
        self.meta = meta
        self.state = live.state_regions()
        self._kv = {k: r[:position] for k, r in live.kv_regions().items()}
        self.kv = (True,) if self._kv else ()

    def kv_rows(self, key: str) -> torch.Tensor:
        return self._kv[key]


@torch.no_grad()
def greedy(model, obs: torch.Tensor, steps: int, chunk_size: int | None = None
           ) -> tuple[list[int], torch.Tensor]:
    """Append ``obs`` at the model's current live state, then decode ``steps`` tokens greedily.

    Runs on the model directly (no engine, no restore): whatever the live buffers and metadata
    hold is what it continues from. Returns the tokens and the logits of every step [steps, V].
    ``chunk_size`` splits ``obs`` the way the engine does.
    """
    cs = chunk_size or obs.shape[0]
    hs = [model.forward(obs[i:i + cs]) for i in range(0, obs.shape[0], cs)]
    h = hs[-1]
    emb = model.token_embedding()
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(steps):
        lg = model.logits(h[-1]).float()
        tok = int(lg.argmax())
        tokens.append(tok)
        logits.append(lg)
        h = model.forward(emb(torch.tensor([tok], device=model.live.device)).float())
    return tokens, torch.stack(logits)
