"""Tiers and byte budgets: where a capsule's bytes live, and who moves when a tier is full.

Three tiers, top to bottom:

* ``device``: the live state's device; a committed capsule starts here (its KV segments shared
  with the stream's earlier boundaries, so bytes are counted per unique tensor storage);
* ``host``: CPU memory (page-locked where CUDA exists, so a promotion is a fast DMA); a capsule
  moved here gets its own compacted copy;
* ``file``: one safetensors file per capsule in a scratch directory (``files.save_capsule``).

Each tier has a byte budget (``None`` = unlimited). When one is exceeded the least-recently-used
unpinned capsules move down a tier; below the bottom tier (the file tier, or the host tier when no
directory is configured) history entries are dropped, oldest first. A stream's current boundary
and its base are never dropped: when nothing else can give way the operation is refused with
``CapsuleBudgetError`` (code ``CAPSULE_BUDGET``) and nothing changes. Every decision is planned on
byte counts first and carried out after, so a budget is never found exceeded by allocating.

On a CPU-only machine device and host are the same memory; the tiers are still modelled and
counted separately (the budgets then say how the same RAM is split).

This module only accounts and moves; ``store.CapsuleStore`` owns the references.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable

import torch

from ..status_codes import Code
from .capsule import Capsule, CapsuleError, KVSegment
from .fingerprint import Fingerprint
from .layout import StateLayout

log = logging.getLogger(__name__)


class Tier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    FILE = "file"


ORDER = (Tier.DEVICE, Tier.HOST, Tier.FILE)
TIER_FILE_PREFIX = "tier-"


class CapsuleBudgetError(CapsuleError):
    """A capsule does not fit the tier budgets (or nothing could give way); nothing changed."""

    code = Code.CAPSULE_BUDGET


@dataclass
class TierConfig:
    """Budgets in bytes (``None`` = unlimited) and where the tiers are."""

    device_bytes: int | None = None
    host_bytes: int | None = None
    file_bytes: int | None = None
    file_dir: str | os.PathLike | None = None   # no directory: no file tier
    layout: StateLayout | None = None           # needed with a file tier (written into each file)
    device: str | torch.device = "cpu"          # the live state's device: promotions go there
    pin_host: bool | None = None                # default: torch.cuda.is_available()

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "file_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None or an int >= 0, not {v!r}")
        if self.file_dir is not None and self.layout is None:
            raise ValueError("a file tier needs the state layout (TierConfig.layout)")
        if self.pin_host is None:
            self.pin_host = torch.cuda.is_available()

    def budget(self, tier: Tier) -> float:
        v = {Tier.DEVICE: self.device_bytes, Tier.HOST: self.host_bytes,
             Tier.FILE: self.file_bytes}[tier]
        if tier is Tier.FILE and self.file_dir is None:
            return 0
        return float("inf") if v is None else v

    @property
    def has_file(self) -> bool:
        return self.file_dir is not None


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def storages(capsule: Capsule) -> dict[tuple[str, int], int]:
    """Unique tensor storages a capsule holds (KV segments, state, meta tensors) -> bytes."""
    out: dict[tuple[str, int], int] = {}
    tensors: list[torch.Tensor] = [t for seg in capsule.kv for t in seg.rows.values()]
    tensors += list(capsule.state.values()) + list(capsule.meta_tensors.values())
    for t in tensors:
        n = t.untyped_storage().nbytes()
        if n:
            out[_storage_key(t)] = n
    return out


def own_bytes(capsule: Capsule) -> int:
    """Bytes of a compacted copy of the capsule (what a lower tier holds for it)."""
    return capsule.nbytes


def journal_bytes(capsule: Capsule) -> int:
    return sum(e.embeds.numel() * e.embeds.element_size() for e in capsule.journal)


@dataclass(eq=False)
class Resident:
    """One capsule the store holds, wherever its bytes are. Slots refer to these."""

    id: int
    capsule: Capsule | None          # None while in the file tier
    tier: Tier
    position: int
    fingerprint: Fingerprint
    own: int                         # bytes of a compacted copy (kv + state + meta tensors)
    payload: int                     # own + journal: what the file tier holds
    storages: dict = field(default_factory=dict)  # device tier: storage key -> bytes
    last_used: int = 0
    refs: int = 0
    path: Path | None = None


@dataclass
class Plan:
    moves: dict[int, Tier] = field(default_factory=dict)   # id -> final tier
    drops: list[int] = field(default_factory=list)


@dataclass
class Refs:
    """The store's references, as the planner sees them (possibly a hypothetical future)."""

    anchors: set[int]                 # current or base of some slot: never dropped
    pinned: set[int]                  # referenced by a pinned slot: never moved or dropped
    histories: list[list[int | None]]  # each slot's history ids, oldest first (None: empty)


class TierManager:
    def __init__(self, config: TierConfig | None = None) -> None:
        self.config = config or TierConfig()
        self.residents: dict[int, Resident] = {}
        self._clock = 0
        self.counters = {
            "moves": 0, "moves_by_path": {},
            "promotions": 0, "promotions_by_path": {},
            "evictions": 0, "refused": 0, "oversized": 0, "move_failures": 0,
        }
        if self.config.has_file:
            d = Path(self.config.file_dir)
            d.mkdir(parents=True, exist_ok=True)
            # Tier files are scratch: capsule ids are per process, so an earlier process's are garbage.
            mine = f"{TIER_FILE_PREFIX}{os.getpid()}-"
            for p in d.glob(f"{TIER_FILE_PREFIX}*"):
                if p.name.startswith(mine):
                    continue
                try:
                    p.unlink()
                except OSError:
                    pass

    @property
    def enabled(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.device_bytes, c.host_bytes, c.file_bytes)) or c.has_file

    # -- registry --------------------------------------------------------------------------
    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def new_resident(self, capsule: Capsule) -> Resident:
        """A record for a capsule entering the store (device tier); the store registers it."""
        return Resident(id=capsule.id, capsule=capsule, tier=Tier.DEVICE,
                        position=capsule.position, fingerprint=capsule.fingerprint,
                        own=own_bytes(capsule), payload=own_bytes(capsule) + journal_bytes(capsule),
                        storages=storages(capsule), last_used=self.tick())

    def release(self, res: Resident) -> None:
        """Forget a capsule nothing refers to any more (removes its tier file)."""
        self.residents.pop(res.id, None)
        if res.path is not None:
            try:
                res.path.unlink()
            except OSError:
                pass
        res.capsule = None

    def check_size(self, capsule: Capsule) -> None:
        """Refuse a capsule no tier could ever hold, or that could never be brought back into
        memory to be restored (a restore reads from the device or host tier; a file alone is
        not enough)."""
        if not self.enabled:
            return
        need = own_bytes(capsule)
        largest = max(self.config.budget(t) for t in ORDER)
        memory = max(self.config.budget(Tier.DEVICE), self.config.budget(Tier.HOST))
        if need > largest or need > memory:
            self.counters["oversized"] += 1
            self.counters["refused"] += 1
            raise CapsuleBudgetError(
                f"capsule of {need} bytes (position {capsule.position}) is larger than every tier "
                f"budget it could be restored from (device {self._fmt(Tier.DEVICE)}, host "
                f"{self._fmt(Tier.HOST)}; file {self._fmt(Tier.FILE)})")

    def _fmt(self, tier: Tier) -> str:
        b = self.config.budget(tier)
        if tier is Tier.FILE and not self.config.has_file:
            return "none"
        return "unlimited" if b == float("inf") else f"{int(b)} B"

    # -- accounting ------------------------------------------------------------------------
    def usage(self, ids: Iterable[int] | None = None) -> dict[Tier, int]:
        ids = self.residents if ids is None else ids
        out = {t: 0 for t in ORDER}
        seen: set = set()
        for i in ids:
            res = self.residents[i]
            if res.tier is Tier.DEVICE:
                for k, n in res.storages.items():
                    if k not in seen:
                        seen.add(k)
                        out[Tier.DEVICE] += n
            elif res.tier is Tier.HOST:
                out[Tier.HOST] += res.own
            else:
                out[Tier.FILE] += res.payload
        return out

    # -- planning --------------------------------------------------------------------------
    def plan(self, refs: Refs, *, extra: Resident | None = None, promote: dict[int, Tier] | None = None,
             keep: set[int] = frozenset()) -> Plan:
        """Moves and drops that bring every tier within budget, or ``CapsuleBudgetError``.

        ``refs`` describe the references after the operation; ``extra`` is a capsule about to be
        added (device tier); ``promote`` lists ids the operation brings up (id -> target tier).
        Ids in ``keep`` are not moved. Tries moving first (LRU down a tier, dropping history
        only below the bottom), then, if that cannot work, dropping history before moving.
        """
        if not self.enabled:
            return Plan()
        try:
            return self._plan(refs, extra, promote or {}, keep, drop_first=False)
        except CapsuleBudgetError:
            return self._plan(refs, extra, promote or {}, keep, drop_first=True)

    def _plan(self, refs: Refs, extra: Resident | None, promote: dict[int, Tier], keep: set[int],
              drop_first: bool) -> Plan:
        cfg = self.config
        referenced = set(refs.anchors)
        for h in refs.histories:
            referenced.update(i for i in h if i is not None)
        residents = dict(self.residents)
        if extra is not None:
            residents[extra.id] = extra
        live = {i: residents[i] for i in referenced if i in residents}
        tier_of = {i: promote.get(i, r.tier) for i, r in live.items()}
        histories = [list(h) for h in refs.histories]
        dropped: list[int] = []

        # device storage refcounts; a promoted capsule arrives as its own compacted copy
        dev_refs: dict = {}
        dev_size: dict = {}

        def dev_keys(i: int) -> dict:
            r = live[i]
            if r.tier is Tier.DEVICE:
                return r.storages
            return {("promoted", i): r.own}

        def dev_add(i: int) -> None:
            for k, n in dev_keys(i).items():
                dev_refs[k] = dev_refs.get(k, 0) + 1
                dev_size[k] = n

        def dev_remove(i: int) -> None:
            for k in dev_keys(i):
                dev_refs[k] -= 1
                if not dev_refs[k]:
                    del dev_refs[k]

        for i, t in tier_of.items():
            if t is Tier.DEVICE:
                dev_add(i)

        def used(t: Tier) -> int:
            if t is Tier.DEVICE:
                return sum(dev_size[k] for k in dev_refs)
            if t is Tier.HOST:
                return sum(live[i].own for i, tt in tier_of.items() if tt is Tier.HOST)
            return sum(live[i].payload for i, tt in tier_of.items() if tt is Tier.FILE)

        def lru(cands: list[int]) -> int | None:
            return min(cands, key=lambda i: live[i].last_used) if cands else None

        def movable(t: Tier) -> list[int]:
            return [i for i, tt in tier_of.items() if tt is t and i not in refs.pinned and i not in keep]

        def droppable(t: Tier) -> list[int]:
            out = []
            for i in movable(t):
                if i in refs.anchors:
                    continue
                holders = [h for h in histories if i in h]
                if holders and all(_oldest(h) == i for h in holders):
                    out.append(i)
            return out

        def drop(i: int) -> None:
            if tier_of[i] is Tier.DEVICE:
                dev_remove(i)
            del tier_of[i]
            for h in histories:
                if _oldest(h) == i:
                    del h[:h.index(i) + 1]   # with any empty (None) entries before it
            dropped.append(i)

        def move(i: int, to: Tier) -> None:
            if tier_of[i] is Tier.DEVICE:
                dev_remove(i)
            tier_of[i] = to
            if to is Tier.DEVICE:
                dev_add(i)

        bottom = Tier.FILE if cfg.has_file else Tier.HOST
        for _ in range(4 * len(tier_of) + 4):
            over = next((t for t in ORDER if t is not Tier.FILE or cfg.has_file
                         if used(t) > cfg.budget(t)), None)
            if over is None:
                break
            victim = lru(droppable(over)) if (drop_first or over is bottom) else None
            if victim is not None:
                drop(victim)
                continue
            if over is bottom:
                raise self._refuse(over, used(over))
            victim = lru(movable(over))
            if victim is None:
                raise self._refuse(over, used(over))
            move(victim, ORDER[ORDER.index(over) + 1])
        else:  # pragma: no cover - the loop always moves something down or drops it
            raise self._refuse(Tier.DEVICE, used(Tier.DEVICE))

        plan = Plan(drops=dropped)
        for i, t in tier_of.items():
            if extra is not None and i == extra.id:
                if t is not Tier.DEVICE:
                    plan.moves[i] = t
            elif t is not live[i].tier:
                plan.moves[i] = t
        return plan

    def _refuse(self, tier: Tier, used: int) -> CapsuleBudgetError:
        return CapsuleBudgetError(
            f"{tier.value} tier budget {self._fmt(tier)} exceeded ({used} B needed) and nothing "
            "unpinned can move or be dropped (current boundaries and bases are never dropped)")

    # -- carrying out ----------------------------------------------------------------------
    def execute(self, plan: Plan) -> None:
        """Carry out a plan's moves, lowest target tier first (frees before it allocates)."""
        for target in (Tier.FILE, Tier.HOST, Tier.DEVICE):
            for i, t in plan.moves.items():
                if t is target and i in self.residents:
                    self.move(self.residents[i], t)

    def move(self, res: Resident, to: Tier) -> None:
        frm = res.tier
        if frm is to:
            return
        try:
            if to is Tier.FILE:
                self._to_file(res)
            else:
                capsule = res.capsule if res.capsule is not None else self._from_file(res)
                res.capsule = copy_capsule(capsule, self._device(to),
                                           pin=to is Tier.HOST and bool(self.config.pin_host))
                res.storages = storages(res.capsule) if to is Tier.DEVICE else {}
                if res.path is not None:
                    try:
                        res.path.unlink()
                    except OSError:
                        pass
                    res.path = None
        except Exception as e:  # a failed write or copy leaves the capsule where it was
            self.counters["move_failures"] += 1
            log.warning("capsule %d: move %s->%s failed: %s", res.id, frm.value, to.value, e)
            if to is not Tier.FILE and res.capsule is None:
                raise CapsuleError(f"capsule {res.id}: could not be read back from its tier file: {e}") from e
            return
        res.tier = to
        path = f"{frm.value}->{to.value}"
        key = "promotions" if ORDER.index(to) < ORDER.index(frm) else "moves"
        self.counters[key] += 1
        self.counters[f"{key}_by_path"][path] = self.counters[f"{key}_by_path"].get(path, 0) + 1

    def _device(self, tier: Tier) -> torch.device:
        return torch.device(self.config.device) if tier is Tier.DEVICE else torch.device("cpu")

    def _to_file(self, res: Resident) -> None:
        from .files import save_capsule

        assert res.capsule is not None and self.config.layout is not None
        name = f"{TIER_FILE_PREFIX}{os.getpid()}-{res.id}"
        res.path = save_capsule(res.capsule, self.config.file_dir, name, self.config.layout)
        res.capsule = None
        res.storages = {}

    def _from_file(self, res: Resident) -> Capsule:
        from .files import load_capsule

        assert res.path is not None and self.config.layout is not None
        loaded = load_capsule(res.path, res.fingerprint, self.config.layout)
        return dataclasses.replace(loaded, id=res.id)

    def counts(self, ids: Iterable[int] | None = None) -> dict:
        ids = list(self.residents if ids is None else ids)
        used = self.usage(ids)
        out = {}
        for t in ORDER:
            b = self.config.budget(t)
            out[t.value] = {"bytes": used[t],
                            "budget": None if b == float("inf") else int(b),
                            "capsules": sum(1 for i in ids if self.residents[i].tier is t)}
        if not self.config.has_file:
            out[Tier.FILE.value]["budget"] = 0
        return out


def _oldest(history: list[int | None]) -> int | None:
    """The oldest real (non-empty) entry of a history: the only one that may be dropped, so
    rollback(k) never skips a boundary."""
    return next((i for i in history if i is not None), None)


def copy_capsule(capsule: Capsule, device: torch.device, pin: bool = False) -> Capsule:
    """Its own compacted copy of ``capsule`` on ``device`` (same id, same journal)."""
    def alloc(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=device,
                           pin_memory=bool(pin) and device.type == "cpu")

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

    def clone(t: torch.Tensor) -> torch.Tensor:
        dst = alloc(t, tuple(t.shape))
        dst.copy_(t)
        return dst

    state = MappingProxyType({k: clone(t) for k, t in capsule.state.items()})
    meta_t = MappingProxyType({k: t.clone() for k, t in capsule.meta_tensors.items()})
    return dataclasses.replace(capsule, kv=segs, state=state, meta_tensors=meta_t)
