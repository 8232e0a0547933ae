"""Bounded context: refuse / reset / rebase, and no index error at exactly the limit.

* refuse: a query that does not fit raises CapsuleRosError(CONTEXT_FULL) and changes nothing
  (boundary, history, counters, live state; the next query that fits works);
* reset: event CONTEXT_RESET, the query runs from the stream's base;
* rebase: event CONTEXT_REBASED, the boundary equals a cold run of base + the last W
  observations that fit + the new one, and delta commits after the rebase stay exact;
* the edges: streams filled to n = max_len - k exactly for several k, appends that end exactly
  at max_len, decode at the last position, and one past it: always a coded error, never an
  IndexError or a silent wrap -- for every family config.
"""
from __future__ import annotations

import glob
import itertools
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch

from capsule_ros.capsule import JournalEntry
from capsule_ros.models.hybrid import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.verify import compare_capsules, live_mismatches
from capsule_ros.status_codes import CapsuleRosError, Code

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/models/default_qwen3_5.json"] + sorted(
    str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "config/models/tiny_*.json")))
MAX_LEN = 64
CHUNK = 8
_seeds = itertools.count(100)


def load(config: str, max_len: int = MAX_LEN) -> HybridModel:
    return HybridModel.load(ModelSpec(config_file=str(ROOT / config), max_len=max_len))


@pytest.fixture(scope="module")
def qwen() -> HybridModel:
    return load("config/models/tiny_qwen3_5_text.json")


def x(m: HybridModel, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(next(_seeds))
    return torch.randn(n, m.hidden_size, generator=g)


def q(e: Engine, stream: str, n: int):
    r = e.query(stream, x(e.model, n), act=lambda h: h.clone())
    e.commit()
    return r


def assert_cold(e: Engine, stream: str) -> None:
    """The stream's boundary equals a cold replay of its whole journal from the empty state."""
    cap = e.boundary(stream)
    rep = compare_capsules(e.model.live.layout, cap, e.recompute(cap, None))
    assert rep.ok, rep.text()


def make_base(e: Engine, n: int = 10):
    e.add_stream("seed")
    q(e, "seed", n)
    return e.boundary("seed")


def test_refuse_changes_nothing(qwen):
    e = Engine(qwen, chunk_size=CHUNK, context_policy="refuse", full_journal=True)
    e.add_stream("a")
    for n in (20, 20, 20):
        q(e, "a", n)
    cap = e.boundary("a")
    slot = e.store.slot("a")
    before = (len(slot.history), slot.commits, dict(e.counters), e.store.stats())
    live = {k: r.clone() for k, r in qwen.live.regions.items()}
    with pytest.raises(CapsuleRosError) as err:
        e.query("a", x(qwen, 5), act=lambda h: h)
    assert err.value.code is Code.CONTEXT_FULL
    assert e.boundary("a") is cap
    assert (len(slot.history), slot.commits, dict(e.counters), e.store.stats()) == before
    assert all(torch.equal(live[k], r) for k, r in qwen.live.regions.items())
    assert live_mismatches(qwen.live, cap, qwen.read_meta()) == []
    r = q(e, "a", 4)  # exactly to the limit: fits
    assert r.position == MAX_LEN and not r.events
    assert_cold(e, "a")


def test_reset_runs_from_the_base(qwen):
    e = Engine(qwen, chunk_size=CHUNK, context_policy="reset", full_journal=True)
    base = make_base(e, 10)
    e.add_stream("a", base=base)
    for n in (20, 20, 12):
        q(e, "a", n)
    assert e.boundary("a").position == MAX_LEN - 2
    r = e.query("a", x(qwen, 7), act=lambda h: h)
    assert [c for c, _ in r.events] == [Code.CONTEXT_RESET]
    e.commit()
    cap = e.boundary("a")
    assert cap.position == base.position + 7
    assert len(cap.journal) == len(base.journal) + 1
    assert all(a is b for a, b in zip(cap.journal, base.journal))
    assert e.counters["context_resets"] == 1
    assert_cold(e, "a")
    q(e, "a", 9)  # delta commit after the reset
    assert_cold(e, "a")


# (base size, observation sizes, new query size, indices of the observations the rebase keeps):
# the window is 3; in the second case the oldest of the last 3 (20 tokens) no longer fits.
REBASES = {"empty-base": (0, (9, 11, 7, 13, 10), 15, (2, 3, 4)),
           "base": (6, (9, 11, 20, 9, 5), 30, (3, 4))}


@pytest.mark.parametrize("case", sorted(REBASES))
def test_rebase_equals_cold_run_and_delta_commits_stay_exact(qwen, case):
    b0, sizes, n_new, kept = REBASES[case]
    e = Engine(qwen, chunk_size=CHUNK, context_policy="rebase", rebase_window=3, full_journal=True)
    base = make_base(e, b0) if b0 else None
    e.add_stream("a", base=base)
    observations = [x(qwen, n) for n in sizes]
    for obs in observations:
        e.query("a", obs, act=lambda h: h)
        e.commit()
    assert e.boundary("a").position == b0 + sum(sizes)
    new = x(qwen, n_new)
    r = e.query("a", new, act=lambda h: h)
    assert [c for c, _ in r.events] == [Code.CONTEXT_REBASED]
    e.commit()
    cap = e.boundary("a")
    assert cap.position == b0 + sum(sizes[i] for i in kept) + n_new
    # The test's own tensors, replayed from the empty state: base, the kept observations, the new one.
    replay = ([base.journal[0].embeds] if base else []) + [observations[i] for i in kept] + [new]
    cold = e.recompute(SimpleNamespace(journal=tuple(JournalEntry(t) for t in replay),
                                       position=sum(t.shape[0] for t in replay)))
    rep = compare_capsules(qwen.live.layout, cap, cold)
    assert rep.ok, rep.text()
    for n in (3, 5, 1):  # delta commits on the rebased boundary
        q(e, "a", n)
        assert_cold(e, "a")
    assert e.counters["context_rebases"] == 1


def test_too_large_for_any_policy_is_coded(qwen):
    for policy in ("refuse", "reset", "rebase"):
        e = Engine(qwen, chunk_size=CHUNK, context_policy=policy, full_journal=True)
        e.add_stream("a")
        with pytest.raises(CapsuleRosError) as err:
            e.query("a", x(qwen, MAX_LEN + 1), act=lambda h: h)
        assert err.value.code is Code.CONTEXT_FULL
        r = q(e, "a", MAX_LEN)  # exactly the whole context in one query
        assert r.position == MAX_LEN
        assert_cold(e, "a")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_exact_limit_never_an_index_error(config):
    max_len = 24
    m = load(config, max_len)
    for policy in ("refuse", "reset", "rebase"):
        e = Engine(m, chunk_size=CHUNK, context_policy=policy, rebase_window=2, full_journal=True)
        for k in (0, 1, CHUNK):
            s = f"{policy}{k}"
            e.add_stream(s)
            n = max_len - k
            q(e, s, n - 3)
            q(e, s, 3)  # now at n = max_len - k exactly
            assert e.boundary(s).position == n
            if k:
                # A query ending exactly at max_len, then decode steps past it.
                r = e.query(s, x(m, k), act=lambda h: h)
                assert r.position == max_len and not r.events
                with pytest.raises(CapsuleRosError) as err:
                    e.extend(x(m, 1))
                assert err.value.code is Code.CONTEXT_FULL
                e.commit()
                assert_cold(e, s)
            # One more token: the policy decides, with a code, never an IndexError.
            if policy == "refuse":
                with pytest.raises(CapsuleRosError) as err:
                    e.query(s, x(m, 1), act=lambda h: h)
                assert err.value.code is Code.CONTEXT_FULL
                continue
            r = e.query(s, x(m, 1), act=lambda h: h)
            want = Code.CONTEXT_RESET if policy == "reset" else Code.CONTEXT_REBASED
            assert [c for c, _ in r.events] == [want]
            e.commit()
            assert_cold(e, s)
    # Decode one token at a time up to the last position.
    e = Engine(m, chunk_size=CHUNK, context_policy="refuse", full_journal=True)
    e.add_stream("d")
    e.query("d", x(m, max_len - 3), act=lambda h: h)
    for _ in range(3):
        e.extend(x(m, 1))
    assert m.position == max_len
    e.commit()
    assert_cold(e, "d")
