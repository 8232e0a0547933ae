"""A hypothesis state machine over several streams of one engine, with real forward passes.

Rules: query (random small embeddings), fork, rollback(k), reset, pin/unpin, drop (unpinned,
non-configured streams), save/load through the file tier, and restore-and-check. The reference
is, per stream, the journal of what was appended (plain tensors kept by the test, not the
engine's capsules) plus its history and base. A check recomputes a stream cold -- the
reference journal replayed from the empty state through the model on the same engine -- and
compares it byte for byte with the stream's committed boundary and with the live buffers after
``engine.restore``. No journal is kept (no verify mode, no rebase), so the reference journal is
the test's own. Every stream is checked at teardown, so a query on one stream that leaked
into another (cross-stream contamination) is caught.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from capsule_ros.capsule import CapsuleError, JournalEntry, files
from capsule_ros.models.hybrid import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.verify import compare_capsules, live_mismatches

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "config/models/tiny_qwen3_5_text.json"
MAX_LEN = 128      # 12 steps x at most 6 tokens never reach it: no context policy in play
DEPTH = 3
CONFIGURED = ("s0", "s1")

_model: HybridModel | None = None


def model() -> HybridModel:
    global _model
    if _model is None:
        _model = HybridModel.load(ModelSpec(config_file=str(ROOT / CONFIG), max_len=MAX_LEN))
    return _model


class Ref:
    """What a stream should hold: journal (tuple of tensors), history, base, pinned."""

    def __init__(self, journal=(), base=(), at_base=True) -> None:
        self.journal: tuple = journal
        self.base: tuple = base
        self.at_base = at_base              # current boundary *is* the base capsule
        self.history: list[tuple[tuple, bool]] = []
        self.pinned = False

    def push(self) -> None:
        """The current boundary joins the history (the empty context too: rollback reaches it)."""
        self.history.append((self.journal, self.at_base))
        del self.history[:-DEPTH]


def pick(data, names) -> str:
    return data.draw(st.sampled_from(sorted(names)))


class CapsuleMachine(RuleBasedStateMachine):

    def __init__(self) -> None:
        super().__init__()
        self.m = model()
        self.e = Engine(self.m, history_depth=DEPTH, chunk_size=4)
        self.ref: dict[str, Ref] = {}
        self.n_new = 0
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        try:
            if self.e._pending is None:
                for s in list(self.ref):
                    self._check(s)
        finally:
            self.tmp.cleanup()

    # -- helpers -----------------------------------------------------------------------------
    def _cold(self, journal: tuple):
        entries = tuple(JournalEntry(t) for t in journal)
        return self.e.recompute(SimpleNamespace(  # from the empty state
            journal=entries, position=sum(t.shape[0] for t in journal)))

    def _check(self, s: str) -> None:
        r = self.ref[s]
        cap = self.e.boundary(s)
        assert cap.position == sum(t.shape[0] for t in r.journal)
        assert cap.journal == ()  # no verify mode, no rebase: no journal is kept
        cold = self._cold(r.journal)
        rep = compare_capsules(self.m.live.layout, cap, cold)
        assert rep.ok, rep.text()
        self.m.live.scrub()
        self.e.invalidate()
        assert self.e.restore(s)
        assert live_mismatches(self.m.live, cap, self.m.read_meta()) == []

    # -- rules -------------------------------------------------------------------------------
    @initialize()
    def configured(self):
        # s0 starts empty; s1 starts at a base (a 5-token prompt), which reset returns to.
        self.e.add_stream("seed")
        prompt = torch.randn(5, self.m.hidden_size, generator=torch.Generator().manual_seed(7))
        self.e.query("seed", prompt, act=lambda h: None)
        self.e.commit()
        base = self.e.boundary("seed")
        self.e.drop("seed")
        self.e.add_stream("s0")
        self.e.add_stream("s1", base=base)
        self.ref["s0"] = Ref()
        self.ref["s1"] = Ref(journal=(prompt,), base=(prompt,))

    @invariant()
    def store_matches_reference(self):
        assert self.e.store.list() == sorted(self.ref)
        for s, r in self.ref.items():
            slot = self.e.store.slot(s)
            assert len(slot.history) == len(r.history), s
            assert slot.pinned == r.pinned, s
            assert self.e.store.stats()["per_stream"][s]["position"] == sum(t.shape[0] for t in r.journal)

    @rule(data=st.data(), n=st.integers(1, 6), seed=st.integers(0, 2**16))
    def query(self, data, n, seed):
        s = pick(data, self.ref)
        x = torch.randn(n, self.m.hidden_size, generator=torch.Generator().manual_seed(seed))
        res = self.e.query(s, x, act=lambda h: h.clone())
        assert not res.events
        self.e.commit()
        r = self.ref[s]
        r.push()
        r.journal = r.journal + (x,)
        r.at_base = False

    @rule(data=st.data())
    def fork(self, data):
        s = pick(data, self.ref)
        self.n_new += 1
        new = f"f{self.n_new}"
        self.e.fork(s, new)
        src = self.ref[s]
        self.ref[new] = Ref(src.journal, src.base, src.at_base)

    @rule(data=st.data(), k=st.integers(1, DEPTH + 1))
    def rollback(self, data, k):
        s = pick(data, self.ref)
        r = self.ref[s]
        if k > len(r.history):
            with pytest.raises(CapsuleError):
                self.e.rollback(s, k)
            return
        self.e.rollback(s, k)
        del r.history[len(r.history) - k + 1:]
        r.journal, r.at_base = r.history.pop()

    @rule(data=st.data())
    def reset(self, data):
        s = pick(data, self.ref)
        self.e.reset(s)
        r = self.ref[s]
        if not r.at_base:
            r.push()
            r.journal, r.at_base = r.base, True

    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data, pinned):
        s = pick(data, self.ref)
        self.e.store.pin(s, pinned)
        self.ref[s].pinned = pinned

    @precondition(lambda self: len(self.ref) > len(CONFIGURED))
    @rule(data=st.data())
    def drop(self, data):
        s = pick(data, set(self.ref) - set(CONFIGURED))
        if self.ref[s].pinned:
            with pytest.raises(CapsuleError):
                self.e.drop(s)
            return
        self.e.drop(s)
        del self.ref[s]

    @rule(data=st.data())
    def save_and_load(self, data):
        """File round trip: the loaded capsule becomes a new stream's boundary."""
        s = pick(data, [k for k, r in self.ref.items() if r.journal] or ["s1"])
        self.n_new += 1
        new = f"l{self.n_new}"
        files.save_capsule(self.e.boundary(s), self.tmp.name, new, self.m.live.layout)
        self.e.install(new, files.load_capsule((self.tmp.name, new), self.m.fingerprint,
                                               self.m.live.layout))
        self.ref[new] = Ref(self.ref[s].journal, (), False)

    @rule(data=st.data())
    def restore_and_check(self, data):
        s = pick(data, self.ref)
        self._check(s)


CapsuleMachine.TestCase.settings = settings(deadline=None, derandomize=True, max_examples=15,
                                            stateful_step_count=12, database=None)
TestCapsuleMachine = CapsuleMachine.TestCase
