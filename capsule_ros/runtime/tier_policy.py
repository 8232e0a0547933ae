"""Tier budgets: which capsule moves down (or is dropped) when a tier is full, and which comes
back up before a restore. Policy above the store: it plans on byte counts first, then asks the
store to ``demote`` / ``promote`` / ``evict``, so a budget is never found exceeded by allocating.

Each tier has a byte budget (``None`` = unlimited). When one is exceeded the least-recently-used
unpinned capsules move down a tier; below the bottom tier (the file tier, or the host tier when
the store has none) history entries are dropped, oldest first. A stream's current boundary and
its base are never dropped: when nothing else can give way the operation is refused with
``CapsuleBudgetError`` and nothing changes.

Budgets count every byte a capsule holds: KV (a device capsule's shared segments once), state,
meta tensors and journal. On a CPU-only machine device and host are the same memory; the tiers
are still modelled and counted separately (the budgets then say how the same RAM is split).

Without budgets (``TierPolicy(None)``, the default) every verb goes straight to the store and
nothing here runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..capsule import Capsule, CapsuleBudgetError, CapsuleError, CapsuleStore
from ..capsule.store import Held, Refs
from ..capsule.tiers import ORDER, Tier


@dataclass(frozen=True)
class TierConfig:
    """Byte budgets per tier (``None`` = unlimited). The file tier exists when the store has one."""

    device_bytes: int | None = None
    host_bytes: int | None = None
    file_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "file_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None or an int >= 0, not {v!r}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.device_bytes, self.host_bytes, self.file_bytes))


@dataclass
class Plan:
    moves: dict[int, Tier] = field(default_factory=dict)   # id -> final tier
    drops: list[int] = field(default_factory=list)


class TierPolicy:
    """Budget-aware versions of the store verbs that add or bring back capsules."""

    def __init__(self, config: TierConfig | None = None) -> None:
        self.config = config or TierConfig()
        self.counters = {"refused": 0, "oversized": 0, "move_failures": 0}

    @property
    def enabled(self) -> bool:
        return self.config.any

    # -- verbs ---------------------------------------------------------------------------------
    def commit(self, store: CapsuleStore, stream: str, capsule: Capsule | None) -> None:
        store.slot(stream)
        plan = self._admit(store, capsule, lambda i: store.refs(commit=(stream, i)))
        store.commit(stream, capsule)
        self._apply(store, plan)

    def create(self, store: CapsuleStore, stream: str, base: Capsule | None = None) -> None:
        plan = self._admit(store, base, lambda i: store.refs(new_slot=i))
        store.create(stream, base)
        self._apply(store, plan)

    def install(self, store: CapsuleStore, stream: str, capsule: Capsule) -> None:
        if stream in store:
            self.commit(store, stream, capsule)
            return
        plan = self._admit(store, capsule, lambda i: store.refs(new_slot=i))
        store.install(stream, capsule)
        self._apply(store, plan)

    def set_base(self, store: CapsuleStore, stream: str, capsule: Capsule | None) -> None:
        plan = self._admit(store, capsule, lambda i: store.refs(base=(stream, i)))
        store.set_base(stream, capsule)
        self._apply(store, plan)

    def reset(self, store: CapsuleStore, stream: str) -> None:
        slot = store.slot(stream)
        if slot.held_current is slot.held_base:
            return
        base = slot.held_base
        plan = self.plan(store, store.refs(commit=(stream, None if base is None else base.id)))
        store.reset(stream)
        self._apply(store, plan)

    def fetch(self, store: CapsuleStore, held: Held | None) -> Capsule | None:
        """The capsule behind ``held``, brought to the device tier first if it sits lower (to
        the host tier when the device has no room: a restore reads from either)."""
        if held is None:
            return None
        store._touch(held)
        if held.tier is Tier.DEVICE or (held.tier is Tier.HOST and not self.enabled):
            return held.capsule
        refs = store.refs()
        for target in (Tier.DEVICE, Tier.HOST):
            if target is Tier.HOST and held.tier is Tier.HOST:
                return held.capsule
            try:
                plan = self.plan(store, refs, promote={held.id: target}, keep={held.id})
            except CapsuleBudgetError:
                continue
            plan.moves[held.id] = target
            self._apply(store, plan)
            if held.tier is target:
                return held.capsule
        self.counters["refused"] += 1
        raise CapsuleBudgetError(f"capsule at position {held.position} is in the file tier and "
                                 "neither device nor host budget has room to bring it back")

    def rebalance(self, store: CapsuleStore) -> None:
        """Bring what the store holds within budget (after the budgets changed)."""
        self._apply(store, self.plan(store, store.refs()))

    def stats(self, store: CapsuleStore) -> dict:
        out = {}
        for t in ORDER:
            b = self._budget(store, t)
            out[t.value] = None if b == float("inf") else int(b)
        return {"budgets": out, "counters": dict(self.counters)}

    # -- planning ------------------------------------------------------------------------------
    def _admit(self, store: CapsuleStore, capsule: Capsule | None, refs_for) -> Plan | None:
        """The plan that makes room for ``capsule`` (refused before anything changes)."""
        if capsule is None or not self.enabled:
            return None
        held = store.record(capsule)
        new = held.id not in {h.id for h in store.held()}
        if new:
            self._check_size(store, held)
        try:
            return self.plan(store, refs_for(held.id), extra=held if new else None)
        except CapsuleBudgetError:
            self.counters["refused"] += 1
            raise

    def _apply(self, store: CapsuleStore, plan: Plan | None) -> None:
        if plan is None:
            return
        for i in plan.drops:
            store.evict(i)
        held = {h.id: h for h in store.held()}
        for target in (Tier.FILE, Tier.HOST, Tier.DEVICE):   # free before allocating
            for i, t in plan.moves.items():
                h = held.get(i)
                if t is not target or h is None or h.tier is t:
                    continue
                try:
                    if ORDER.index(t) > ORDER.index(h.tier):
                        store.demote(i, t)
                    else:
                        store.promote(i, t)
                except (OSError, CapsuleError):  # a failed write leaves the capsule where it was
                    self.counters["move_failures"] += 1
                    if t is not Tier.FILE:
                        raise

    def _budget(self, store: CapsuleStore, tier: Tier) -> float:
        v = {Tier.DEVICE: self.config.device_bytes, Tier.HOST: self.config.host_bytes,
             Tier.FILE: self.config.file_bytes}[tier]
        if tier is Tier.FILE and store.files is None:
            return 0
        return float("inf") if v is None else v

    def _fmt(self, store: CapsuleStore, tier: Tier) -> str:
        if tier is Tier.FILE and store.files is None:
            return "none"
        b = self._budget(store, tier)
        return "unlimited" if b == float("inf") else f"{int(b)} B"

    def _check_size(self, store: CapsuleStore, held: Held) -> None:
        """Refuse a capsule no tier could hold, or that could never be brought back into memory
        to be restored (a restore reads from the device or host tier, never from a file)."""
        need = held.own
        largest = max(self._budget(store, t) for t in ORDER)
        memory = max(self._budget(store, Tier.DEVICE), self._budget(store, Tier.HOST))
        if need > largest or need > memory:
            self.counters["oversized"] += 1
            self.counters["refused"] += 1
            raise CapsuleBudgetError(
                f"capsule of {need} bytes (position {held.position}) is larger than every tier "
                f"budget it could be restored from (device {self._fmt(store, Tier.DEVICE)}, host "
                f"{self._fmt(store, Tier.HOST)}; file {self._fmt(store, Tier.FILE)})")

    def plan(self, store: CapsuleStore, refs: Refs, *, extra: Held | None = None,
             promote: dict[int, Tier] | None = None, keep: set[int] = frozenset()) -> Plan:
        """Moves and drops that bring every tier within budget, or ``CapsuleBudgetError``.

        ``refs`` describe the references after the operation; ``extra`` is a capsule about to be
        added (device tier); ``promote`` lists ids the operation brings up (id -> target tier).
        Ids in ``keep`` are not moved. Tries moving first (LRU down a tier, dropping history
        only below the bottom), then, if that cannot work, dropping history before moving.
        """
        if not self.enabled:
            return Plan()
        try:
            return self._plan(store, refs, extra, promote or {}, keep, drop_first=False)
        except CapsuleBudgetError:
            return self._plan(store, refs, extra, promote or {}, keep, drop_first=True)

    def _plan(self, store: CapsuleStore, refs: Refs, extra: Held | None, promote: dict[int, Tier],
              keep: set[int], drop_first: bool) -> Plan:
        has_file = store.files is not None
        referenced = set(refs.anchors)
        for h in refs.histories:
            referenced.update(i for i in h if i is not None)
        residents = {h.id: h for h in store.held()}
        if extra is not None:
            residents[extra.id] = extra
        live = {i: residents[i] for i in referenced if i in residents}
        tier_of = {i: promote.get(i, r.tier) for i, r in live.items()}
        histories = [list(h) for h in refs.histories]
        dropped: list[int] = []

        # device storage refcounts (shared segments count once); a promoted capsule arrives as
        # its own compacted copy
        dev_refs: dict = {}
        dev_size: dict = {}

        def dev_keys(i: int) -> dict:
            r = live[i]
            return r.storages if r.tier is Tier.DEVICE else {("promoted", i): r.own}

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
            return sum(live[i].own for i, tt in tier_of.items() if tt is t)

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

        bottom = Tier.FILE if has_file else Tier.HOST
        for _ in range(4 * len(tier_of) + 4):
            over = next((t for t in ORDER if t is not Tier.FILE or has_file
                         if used(t) > self._budget(store, t)), None)
            if over is None:
                break
            victim = lru(droppable(over)) if (drop_first or over is bottom) else None
            if victim is not None:
                drop(victim)
                continue
            if over is bottom:
                raise self._refuse(store, over, used(over))
            victim = lru(movable(over))
            if victim is None:
                raise self._refuse(store, over, used(over))
            move(victim, ORDER[ORDER.index(over) + 1])
        else:  # pragma: no cover - the loop always moves something down or drops it
            raise self._refuse(store, Tier.DEVICE, used(Tier.DEVICE))

        plan = Plan(drops=dropped)
        for i, t in tier_of.items():
            if extra is not None and i == extra.id:
                if t is not Tier.DEVICE:
                    plan.moves[i] = t
            elif t is not live[i].tier:
                plan.moves[i] = t
        return plan

    def _refuse(self, store: CapsuleStore, tier: Tier, used: int) -> CapsuleBudgetError:
        return CapsuleBudgetError(
            f"{tier.value} tier budget {self._fmt(store, tier)} exceeded ({used} B needed) and "
            "nothing unpinned can move or be dropped (current boundaries and bases are never dropped)")


def _oldest(history: list[int | None]) -> int | None:
    """The oldest real (non-empty) entry of a history: the only one that may be dropped, so
    rollback(k) never skips a boundary."""
    return next((i for i in history if i is not None), None)
