"""Tiers: where a capsule's bytes live, and the copies that move them. Mechanism only.

* ``device``: the live state's device; a snapshot starts here, its KV segments shared with the
  stream's earlier boundaries;
* ``host``: CPU memory (page-locked where asked, so a promotion is a fast DMA); a capsule moved
  here gets its own compacted copy, journal included;
* ``file``: one capsule file per capsule in the node's own tier directory (``TierFiles``).

Which capsule moves where, and when, is policy: ``runtime/tier_policy.py`` decides, the store
(``store.CapsuleStore.promote`` / ``demote``) carries it out with the functions here.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from types import MappingProxyType

import torch

from .capsule import Capsule, JournalEntry, KVSegment
from .files import SUFFIX, clean_stale_temps, load_capsule, save_capsule
from .fingerprint import Fingerprint
from .layout import StateLayout


class Tier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    FILE = "file"


ORDER = (Tier.DEVICE, Tier.HOST, Tier.FILE)
TIER_FILE_PREFIX = "tier-"


def tensors_of(capsule: Capsule) -> list[torch.Tensor]:
    """Every tensor a capsule holds: KV segments, state, meta tensors, journal."""
    out: list[torch.Tensor] = [t for seg in capsule.kv for t in seg.rows.values()]
    out += list(capsule.state.values()) + list(capsule.meta_tensors.values())
    out += [e.embeds for e in capsule.journal]
    return out


def storages(capsule: Capsule) -> dict[tuple[str, int], int]:
    """Unique tensor storages a capsule holds -> bytes (shared segments appear once per capsule;
    callers summing several capsules count each storage once)."""
    out: dict[tuple[str, int], int] = {}
    for t in tensors_of(capsule):
        n = t.untyped_storage().nbytes()
        if n:
            out[(str(t.device), t.untyped_storage().data_ptr())] = n
    return out


def copy_capsule(capsule: Capsule, device: torch.device, pin: bool = False) -> Capsule:
    """Its own compacted copy of ``capsule`` on ``device``: KV, state and journal (same id), so
    nothing of it stays behind in the tier it left; meta tensors are copied where they are."""
    def alloc(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=device,
                           pin_memory=bool(pin) and device.type == "cpu")

    def clone(t: torch.Tensor) -> torch.Tensor:
        dst = alloc(t, tuple(t.shape))
        dst.copy_(t)
        return dst

    segs: tuple[KVSegment, ...] = ()
    if capsule.kv:
        rows = {}
        for key in capsule.kv[0].rows:
            first = capsule.kv[0].rows[key]
            dst = alloc(first, (capsule.position, *first.shape[1:]))
            for seg in capsule.kv:
                dst[seg.start:seg.stop].copy_(seg.rows[key])
            rows[key] = dst
        segs = (KVSegment(0, MappingProxyType(rows)),)
    return capsule.replaced(
        kv=segs, state=MappingProxyType({k: clone(t) for k, t in capsule.state.items()}),
        # meta tensors (e.g. a generator's state, which must stay a CPU tensor) keep their device
        meta_tensors=MappingProxyType({k: t.clone() for k, t in capsule.meta_tensors.items()}),
        journal=tuple(JournalEntry(clone(e.embeds), e.source) for e in capsule.journal))


class TierFiles:
    """A node's own tier directory. Tier files are scratch (capsule ids are per process): the
    owner empties the directory when it opens it. Ownership (one live process) is the caller's
    ``places.CapsuleDirs.claim``."""

    def __init__(self, directory: str | os.PathLike, layout: StateLayout) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        clean_stale_temps(self.directory)
        for p in self.directory.glob(f"{TIER_FILE_PREFIX}*{SUFFIX}"):
            p.unlink(missing_ok=True)

    def write(self, capsule: Capsule) -> Path:
        return save_capsule(capsule, self.directory, f"{TIER_FILE_PREFIX}{capsule.id}", self.layout)

    def read(self, path: Path, fingerprint: Fingerprint, capsule_id: int,
             device: torch.device) -> Capsule:
        loaded = load_capsule(path, fingerprint, self.layout, device=device)
        return dataclasses.replace(loaded, id=capsule_id)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
