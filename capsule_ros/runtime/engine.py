"""The engine: one model, one live buffer set, a capsule slot per stream.

A query on a stream: restore the stream's boundary into the live buffers (skipped when they
already hold it), append the new observation embeddings, act on the last hidden state, and hand
the result back; the caller publishes, then calls ``commit``, which records the new boundary: a
snapshot of the live state that becomes the stream's current capsule in the store (the one
meaning of "commit" here and in the store). Streams
never see each other's state: every query starts from its own stream's capsule.

Verify mode (``verify_every=N``): every N commits of a stream, its boundary is queued for a
cold recompute from its base and journal (the same appends, the same chunking, the same kernels)
compared buffer by buffer with the committed capsule (``runtime/verify.py``). The recompute runs
in ``idle_step`` slices of one chunk each, between queries, when no trigger waits: its progress
is a capsule of its own, restored at the next slice, so queries in between change nothing. A
mismatch is counted (``verify_mismatches``), logged and kept as ``last_verify`` with the first
divergence; ``verify(stream)`` does the same at once (tools and tests).

Compaction (merging a boundary's KV segments once the chain grows past ``max_segments``) also
runs in ``idle_step``; on the query path only past ``store.compact_hard_factor`` times that length
(a node that never idles must still not grow its chains without bound).

The journal (the appended embeddings a capsule carries) is kept only for what needs it: all of it
while verify mode (or ``full_journal``) is on (a cold recompute replays it from the empty state), the last
``rebase_window`` entries under the rebase policy, none otherwise.

This is where a query is scheduled. It knows buffers only through the model binding and the
capsule mechanism, and nothing about ROS.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

import torch

from ..capsule import Capsule, CapsuleError, CapsuleStore, JournalEntry
from ..capsule import capsule as capsule_ops
from ..capsule.tiers import TierFiles
from ..status_codes import CapsuleRosError, Code
from .tier_policy import TierConfig, TierPolicy
from .verify import VerifyReport, compare_capsules

if TYPE_CHECKING:  # the engine runs any model with this interface (torch or ONNX Runtime)
    from ..models.hybrid import HybridModel

T = TypeVar("T")
POLICIES = ("refuse", "reset", "rebase")
log = logging.getLogger(__name__)


@dataclass
class QueryResult(Generic[T]):
    stream: str
    output: T
    position: int            # boundary position once committed
    restore_ms: float
    append_ms: float
    act_ms: float
    restored: bool           # False when the live buffers already held this stream's boundary
    events: list[tuple[Code, str]] = field(default_factory=list)  # e.g. a context reset
    fetch_ms: float = 0.0    # bringing the boundary back from a lower tier (0 when resident)


@dataclass
class _Pending:
    stream: str
    parent: Capsule          # the boundary the live state started from (shares its KV prefix)
    journal: tuple[JournalEntry, ...]


@dataclass
class _Verification:
    """A cold recompute in progress: what it checks, and how far it got."""

    stream: str
    committed: Capsule
    base: Capsule
    chunks: list[torch.Tensor]            # what is still to append, one forward each
    partial: Capsule | None = None        # the recompute so far (None: still at the base)
    started: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, model: HybridModel, *, history_depth: int = 8, chunk_size: int = 64,
                 context_policy: str = "reset", rebase_window: int = 8,
                 max_segments: int = 32, verify_every: int = 0, verify_atol: float = 0.0,
                 full_journal: bool = False) -> None:
        if verify_every < 0:
            raise ValueError("verify_every must be >= 0")
        if context_policy not in POLICIES:
            raise ValueError(f"context_policy must be one of {POLICIES}, not {context_policy!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.model = model
        self.store = CapsuleStore(history_depth, max_segments=max_segments, device=model.live.device,
                                  pin_host=torch.cuda.is_available())
        self.tiers = TierPolicy(None)   # no budgets: nothing ever moves between tiers
        self.chunk_size = chunk_size
        self.context_policy = context_policy
        self.rebase_window = rebase_window
        # Verify mode: every ``verify_every`` commits of a stream, recompute its boundary cold
        # from the journal and compare buffer by buffer (bit-exact unless ``verify_atol`` > 0).
        self._verify_every = verify_every
        self.verify_atol = verify_atol
        # The whole journal from the empty state: what a cold recompute replays (verify mode
        # turns it on; so do proofs and tools that recompute a boundary).
        self._full_journal = full_journal
        self.last_verify: VerifyReport | None = None
        self.last_committed: Capsule | None = None
        self.counters = {"queries": 0, "restores": 0, "restores_skipped": 0, "commits": 0,
                         "context_resets": 0, "context_rebases": 0, "rebase_ms_total": 0.0,
                         "verifies": 0, "verify_mismatches": 0, "verify_errors": 0,
                         "verify_slices": 0, "verify_skipped": 0, "idle_compactions": 0}
        self._verify_due: dict[str, Capsule] = {}     # stream -> boundary to verify (newest)
        self._verifying: _Verification | None = None
        self._pending: _Pending | None = None
        # The capsule the live buffers hold right now (None: dirty, e.g. mid-append).
        self._live_capsule: Capsule | None = None
        # Small named tensors that belong to the live state but not to the model's cache, e.g.
        # a sampler's RNG state. Restored from and committed with every capsule; a query's act
        # may replace entries (``engine.meta_tensors["rng"] = gen.get_state()``).
        self.meta_tensors: dict[str, torch.Tensor] = {}
        self.empty = self._freeze_empty()

    # -- setup ------------------------------------------------------------------------------
    def _freeze_empty(self) -> Capsule:
        for region in self.model.live.regions.values():
            region.zero_()
        self.model.write_meta(self.model.empty_meta())
        empty = capsule_ops.snapshot(self.model.live, fingerprint=self.model.fingerprint, position=0,
                                   meta=self.model.read_meta())
        self._live_capsule = empty
        return empty

    def add_stream(self, stream: str, base: Capsule | None = None) -> None:
        """A new stream, starting empty or at ``base`` (which ``reset`` returns to)."""
        if base is not None:
            self._check_fingerprint(base)
        self.tiers.create(self.store, stream, base)

    def install(self, stream: str, capsule: Capsule) -> None:
        """``capsule`` (e.g. loaded from a file) becomes the stream's boundary; a new stream
        starts at it with no history and no base."""
        self._idle()
        self._check_fingerprint(capsule)
        self.tiers.install(self.store, stream, capsule)

    def configure_tiers(self, config: TierConfig, files: TierFiles | None = None) -> None:
        """Tier budgets, and the node's own tier directory for a file tier. What is held now is
        brought within the new budgets (``CapsuleBudgetError`` if it cannot be)."""
        self.store.files = files
        self.tiers = TierPolicy(config)
        self.tiers.rebalance(self.store)

    def journal_kept(self, journal: tuple[JournalEntry, ...]) -> tuple[JournalEntry, ...]:
        """The part of a journal the enabled features need (see the module docstring)."""
        if self.full_journal:
            return journal
        if self.context_policy == "rebase" and self.rebase_window:
            return journal[-self.rebase_window:]
        return ()

    @property
    def verify_every(self) -> int:
        return self._verify_every

    @verify_every.setter
    def verify_every(self, n: int) -> None:
        """Verify mode can be turned on while serving (a live parameter): journals are kept from
        then on, and boundaries whose journal does not reach back are skipped, not failed."""
        if n < 0:
            raise ValueError("verify_every must be >= 0")
        self._verify_every = n

    @property
    def full_journal(self) -> bool:
        """The whole journal from the empty state: what a cold recompute replays (verify mode
        turns it on; so do proofs and tools that recompute a boundary)."""
        return self._full_journal or self._verify_every > 0

    @property
    def live(self):
        return self.model.live

    # -- the query path --------------------------------------------------------------------
    def query(self, stream: str, embeds: torch.Tensor, act: Callable[[torch.Tensor], T],
              source: str = "") -> QueryResult[T]:
        """Restore, append ``embeds`` [n, hidden], act on the last hidden state. Then ``commit``."""
        if self._pending is not None:
            raise RuntimeError(f"query on {stream!r} while {self._pending.stream!r} awaits commit")
        if stream not in self.store:
            raise CapsuleRosError(Code.UNKNOWN_STREAM, f"unknown stream {stream!r}")
        if embeds.ndim != 2 or embeds.shape[1] != self.model.hidden_size or embeds.shape[0] == 0:
            raise CapsuleRosError(Code.BAD_INPUT, f"embeddings of shape {tuple(embeds.shape)}, "
                                  f"expected [n>0, {self.model.hidden_size}]")
        entry = JournalEntry(embeds.detach().clone(), source)  # stays on its device: no host sync per query
        tf = time.perf_counter()
        start, replay, events = self._plan(stream, entry.embeds.shape[0])
        fetch_ms = (time.perf_counter() - tf) * 1e3

        t0 = _now(self.live.device)
        restored = self._restore(start)
        if replay:  # a rebase re-appends the latest observations after the base: report its cost
            tr = _now(self.live.device)
            for old in replay:
                self._append(old.embeds)
            rebase_ms = (_now(self.live.device) - tr) * 1e3
            self.counters["rebase_ms_total"] += rebase_ms
            events = [(code, f"{text} ({rebase_ms:.1f} ms to re-append "
                             f"{sum(e.embeds.shape[0] for e in replay)} tokens)")
                      if code is Code.CONTEXT_REBASED else (code, text) for code, text in events]
        journal = self.journal_kept(start.journal + replay)
        t1 = _now(self.live.device)
        hidden = self._append(entry.embeds)
        t2 = _now(self.live.device)
        output = act(hidden[-1])
        t3 = _now(self.live.device)
        self._pending = _Pending(stream, start, self.journal_kept(journal + (entry,)))
        self.counters["queries"] += 1
        return QueryResult(stream, output, self.model.position, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                           (t3 - t2) * 1e3, restored, events, fetch_ms)

    def extend(self, embeds: torch.Tensor, source: str = "") -> torch.Tensor:
        """Append more within the pending query (e.g. decoded tokens fed back); returns hidden.

        The appended embeddings join the stream's journal, so cold recompute repeats them.
        """
        if self._pending is None:
            raise RuntimeError("extend outside a query")
        n = embeds.shape[0]
        if self.model.position + n > self.model.max_len:
            raise CapsuleRosError(Code.CONTEXT_FULL, f"extend by {n} at {self.model.position} "
                                  f"exceeds context {self.model.max_len}")
        entry = JournalEntry(embeds.detach().clone(), source)  # stays on its device: no host sync per query
        hidden = self._append(entry.embeds)
        self._pending.journal = self.journal_kept(self._pending.journal + (entry,))
        return hidden

    def commit(self) -> float:
        """Record the pending query's boundary: snapshot the live state (a delta on the boundary
        it started from) and make it the stream's current capsule. Returns milliseconds."""
        if self._pending is None:
            raise RuntimeError("commit without a query")
        p, self._pending = self._pending, None
        t0 = _now(self.live.device)
        capsule = capsule_ops.snapshot(self.live, fingerprint=self.model.fingerprint,
                                       position=self.model.position, meta=self.model.read_meta(),
                                       meta_tensors=self.meta_tensors, journal=p.journal,
                                       parent=p.parent)
        self.tiers.commit(self.store, p.stream, capsule)
        self.last_committed = capsule  # in memory whatever tier the store put it in
        # the store may have merged segments (a new object, same bytes) or moved it to host
        self._live_capsule = self.store.slot(p.stream).held_current.capsule
        self.counters["commits"] += 1
        ms = (_now(self.live.device) - t0) * 1e3
        if self.verify_every and self.store.slot(p.stream).commits % self.verify_every == 0:
            self._verify_due[p.stream] = self._live_capsule  # recomputed at idle, never here
        return ms

    def abort(self) -> None:
        """Forget a query that will not be committed; the stream keeps its previous boundary."""
        self._pending = None
        self._live_capsule = None

    # -- verbs -----------------------------------------------------------------------------
    def rollback(self, stream: str, k: int = 1) -> Capsule:
        self._idle()
        self.store.rollback(stream, k)
        return self.boundary(stream)

    def reset(self, stream: str) -> Capsule:
        self._idle()
        self.tiers.reset(self.store, stream)
        return self.boundary(stream)

    def fork(self, source: str, new_stream: str) -> None:
        self._idle()
        self.store.fork(source, new_stream)

    def drop(self, stream: str) -> None:
        self._idle()
        self.store.drop(stream)

    def boundary(self, stream: str) -> Capsule:
        """The stream's current boundary (the empty capsule for a stream with no context),
        brought back from a lower tier if it sits there."""
        return self._fetch(self.store.slot(stream).held_current) or self.empty

    def _fetch(self, held) -> Capsule | None:
        try:
            return self.tiers.fetch(self.store, held)
        except CapsuleError as e:
            raise CapsuleRosError(Code.CAPSULE_BUDGET, str(e)) from e

    def restore(self, stream: str) -> bool:
        """Load the stream's boundary into the live buffers (tests and tools; queries do it themselves)."""
        self._idle()
        return self._restore(self.boundary(stream))

    def invalidate(self) -> None:
        """Forget what the live buffers hold (call after writing them outside the engine, e.g.
        ``live.scrub()``): the next query restores its stream's boundary."""
        self._idle()
        self._live_capsule = None

    def verify(self, stream: str) -> "VerifyReport":
        """Recompute ``stream``'s boundary cold (its base + journal, same chunking) and compare it
        with the committed capsule buffer by buffer: valid KV rows, conv/recurrent state, meta.
        At once (the idle slices' path, run to the end). Returns the report (also kept as
        ``last_verify``); a mismatch names the first divergence. Meta tensors set by a query's
        act (e.g. sampler RNG) are not derivable from the journal and are not compared."""
        self._idle()
        committed = self.boundary(stream)
        v = self._start_verification(stream, committed)
        saved, self._verifying = self._verifying, v
        try:
            while self._verifying is v:
                self._verify_slice()
        finally:
            self._verifying = saved if saved is not v else None
        return self.last_verify

    # -- idle work: run by the worker between queries, never while a trigger waits ---------
    def idle_step(self) -> tuple[str, VerifyReport | None] | None:
        """One slice of background work: one chunk of a verification, or one compaction.
        Returns what it did (``("verify", report or None until done)``, ``("compact", None)``)
        or None when there is nothing to do."""
        self._idle()
        if self._verifying is None and self._verify_due:
            stream = next(iter(self._verify_due))
            committed = self._verify_due.pop(stream)
            if not self._journal_complete(committed):  # committed before verify mode was on
                self.counters["verify_skipped"] += 1
                return ("verify", None)
            try:
                self._verifying = self._start_verification(stream, committed)
            except Exception as e:  # noqa: BLE001 - a verification that cannot run is counted
                self._verify_failed(stream, e)
                return ("verify", self.last_verify)
        if self._verifying is not None:
            v = self._verifying
            try:
                self._verify_slice()
            except Exception as e:  # noqa: BLE001 - never let verification break serving
                self._verifying = None
                self._live_capsule = None
                self._verify_failed(v.stream, e)
                return ("verify", self.last_verify)
            return ("verify", self.last_verify if self._verifying is None else None)
        stream = next(iter(self.store.compactable()), None)
        if stream is not None:
            self.store.compact(stream)
            self.counters["idle_compactions"] += 1
            return ("compact", None)
        return None

    def prefetch(self, stream: str) -> None:
        """A trigger for ``stream`` was queued: if its boundary sits in the file tier, have the
        tier's I/O thread read it now, so the query finds it in memory. Called from a
        subscription callback: it only reads the store and hands a request on."""
        files = self.store.files
        slot = self.store._slots.get(stream) if files is not None else None
        held = slot.held_current if slot is not None else None
        if held is not None and held.tier.value == "file" and held.path is not None:
            files.prefetch(held.path, held.fingerprint, held.id)

    @property
    def verifications_due(self) -> int:
        return len(self._verify_due) + (self._verifying is not None)

    def _start_verification(self, stream: str, committed: Capsule) -> _Verification:
        slot = self.store.slot(stream) if stream in self.store else None
        base = (self._fetch(slot.held_base) if slot is not None else None) or self.empty
        if not self._journal_complete(committed):
            raise CapsuleError(f"stream {stream!r}: its journal does not reach back to the empty "
                               "state (a full journal is kept only while verify_every > 0 or full_journal)")
        if len(base.journal) > len(committed.journal) or any(
                a is not b for a, b in zip(committed.journal, base.journal)):
            base = self.empty  # the base is not an ancestor of this boundary: replay it all
        # the serving path appended each entry in chunk_size pieces (``_append``): the same here
        chunks = [e.embeds[i:i + self.chunk_size] for e in committed.journal[len(base.journal):]
                  for i in range(0, e.embeds.shape[0], self.chunk_size)]
        return _Verification(stream, committed, base, chunks)

    @staticmethod
    def _journal_complete(capsule: Capsule, base: Capsule | None = None) -> bool:
        """Does the journal replay ``capsule`` from ``base`` (None: from the empty state)?"""
        done = base.position if base is not None else 0
        entries = capsule.journal[len(base.journal):] if base is not None else capsule.journal
        return sum(e.embeds.shape[0] for e in entries) == capsule.position - done

    def _verify_slice(self) -> None:
        """Append the next chunk onto the recompute so far; compare when none is left."""
        v = self._verifying
        start = v.partial or v.base
        self._restore(start)
        if v.chunks:
            self._append(v.chunks.pop(0))
        self.counters["verify_slices"] += 1
        if v.chunks:
            v.partial = capsule_ops.snapshot(self.live, fingerprint=self.model.fingerprint,
                                             position=self.model.position,
                                             meta=self.model.read_meta(),
                                             meta_tensors=self.meta_tensors, parent=start)
            self._live_capsule = v.partial
            return
        cold = capsule_ops.snapshot(self.live, fingerprint=self.model.fingerprint,
                                    position=self.model.position, meta=self.model.read_meta(),
                                    meta_tensors=self.meta_tensors, journal=v.committed.journal)
        self._live_capsule = cold
        report = compare_capsules(self.model.live.layout, v.committed, cold, atol=self.verify_atol)
        report.stream = v.stream
        report.position = v.committed.position
        report.commits = self.store.slot(v.stream).commits if v.stream in self.store else 0
        report.ms = (time.perf_counter() - v.started) * 1e3
        self._verifying = None
        self.counters["verifies"] += 1
        if not report.ok:
            self.counters["verify_mismatches"] += 1
            log.warning("verify %s: %s", v.stream, report.text())
        self.last_verify = report

    def _verify_failed(self, stream: str, e: Exception) -> None:
        self.counters["verify_errors"] += 1
        self.last_verify = VerifyReport(stream=stream, ok=False, error=repr(e))
        log.error("verify %s failed to run: %r", stream, e)

    def recompute(self, capsule: Capsule, base: Capsule | None = None) -> Capsule:
        """Cold recompute of a boundary from its journal, on the same chunking (verify mode).

        The live buffers are left holding the recomputed state; the store is not touched.
        Refused (``CapsuleError``) when the journal does not reach back to ``base``: replaying
        part of a history would silently compute another state.
        """
        self._idle()
        base = base or self.empty
        if not self._journal_complete(capsule, base):
            raise CapsuleError(f"cannot recompute a boundary at {capsule.position}: its journal does "
                               "not reach back to the base (a full journal is kept only while "
                               "verify_every > 0 or full_journal)")
        self._restore(base)
        for entry in capsule.journal[len(base.journal):]:
            self._append(entry.embeds)
        cold = capsule_ops.snapshot(self.live, fingerprint=self.model.fingerprint,
                                  position=self.model.position, meta=self.model.read_meta(),
                                  meta_tensors=self.meta_tensors, journal=capsule.journal)
        self._live_capsule = cold
        return cold

    # -- internals -------------------------------------------------------------------------
    def _idle(self) -> None:
        if self._pending is not None:
            raise RuntimeError("a query awaits commit")

    def _check_fingerprint(self, capsule: Capsule) -> None:
        diff = self.model.fingerprint.diff(capsule.fingerprint)
        if diff:
            raise CapsuleRosError(Code.CAPSULE_REFUSED, "capsule differs in " + ", ".join(diff))

    def _restore(self, capsule: Capsule) -> bool:
        if capsule is self._live_capsule:
            self.counters["restores_skipped"] += 1
            return False
        self._live_capsule = None
        try:
            capsule_ops.restore(capsule, self.live, self.model.fingerprint)
        except CapsuleError as e:
            raise CapsuleRosError(Code.CAPSULE_REFUSED, str(e)) from e
        self.model.write_meta(dict(capsule.meta))
        self.meta_tensors = {k: t.clone() for k, t in capsule.meta_tensors.items()}
        self._live_capsule = capsule
        self.counters["restores"] += 1
        return True

    def _append(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill in chunks of ``chunk_size``; the chunking is part of what a cold run repeats."""
        self._live_capsule = None
        outs = [self.model.forward(embeds[i:i + self.chunk_size])
                for i in range(0, embeds.shape[0], self.chunk_size)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _plan(self, stream: str, n: int
              ) -> tuple[Capsule, tuple[JournalEntry, ...], list[tuple[Code, str]]]:
        """Where a query of ``n`` tokens starts: a capsule, entries to re-append, and events.

        Within the context limit that is the stream's boundary. Past it, the context policy
        decides: refuse (coded error), reset (to the base), or rebase (the base plus the latest
        observations that fit). Never a silent wrap.
        """
        slot = self.store.slot(stream)
        current = self._fetch(slot.held_current) or self.empty
        limit = self.model.max_len
        if current.position + n <= limit:
            return current, (), []
        base = self._fetch(slot.held_base) or self.empty
        why = f"stream {stream!r}: context {current.position}+{n} exceeds {limit}"
        if self.context_policy == "refuse":
            raise CapsuleRosError(Code.CONTEXT_FULL, why + " (policy refuse)")
        if base.position + n > limit:
            raise CapsuleRosError(Code.CONTEXT_FULL, why + "; the base alone leaves no room")
        if self.context_policy == "reset":
            self.counters["context_resets"] += 1
            return base, (), [(Code.CONTEXT_RESET, why + "; reset to base")]
        tail = self._rebase_tail(current, base, limit - n)
        self.counters["context_rebases"] += 1
        return base, tail, [(Code.CONTEXT_REBASED,
                             why + f"; rebased on the last {len(tail)} observations")]

    def _rebase_tail(self, current: Capsule, base: Capsule, budget: int) -> tuple[JournalEntry, ...]:
        """The latest journal entries (at most ``rebase_window``) that fit after the base."""
        own = [e for e, start in zip(current.journal, current.journal_starts())
               if start >= base.position]
        tail: list[JournalEntry] = []
        used = base.position
        for entry in reversed(own[-self.rebase_window:] if self.rebase_window else ()):
            if used + entry.embeds.shape[0] > budget:
                break
            tail.insert(0, entry)
            used += entry.embeds.shape[0]
        return tuple(tail)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def stats(engine: Engine) -> dict[str, Any]:
    """Counts and bytes for diagnostics: the store's bytes by kind and tier, budgets, counters."""
    out = engine.store.stats()
    out["tier_counters"] = {**out.pop("counters"), **engine.tiers.counters}
    out["budgets"] = engine.tiers.stats(engine.store)["budgets"]
    out["counters"] = dict(engine.counters)
    out["live_bytes"] = sum(r.numel() * r.element_size() for r in engine.live.regions.values())
    return out
