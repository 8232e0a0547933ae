"""Tiers and budgets: the tier policy (runtime/tier_policy.py) over the capsule store: LRU moves
device->host->file, eviction of history, pinning, promotion before use, oversized refusal,
counters, byte-exact round trips, and every byte (journal included) counted.

Synthetic capsules (no model): a layout with 64 B of KV per position and 1 KiB of state, so a
full capsule at position 16 is exactly 2 KiB.
"""
from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

from capsule_ros.capsule import (BufferSpec, CapsuleBudgetError, CapsuleError, CapsuleNotInMemory,
                                 CapsuleStore, Fingerprint, JournalEntry, Kind, LiveState,
                                 StateLayout, snapshot)
from capsule_ros.capsule.tiers import Tier, TierFiles
from capsule_ros.runtime.tier_policy import TierConfig, TierPolicy
from capsule_ros.status_codes import Code, capsule_code

MAX = 64
LAYOUT = StateLayout((BufferSpec("L0.k", Kind.KV, torch.float32, (1, 2, MAX, 4), seq_axis=2),
                      BufferSpec("L0.v", Kind.KV, torch.float32, (1, 2, MAX, 4), seq_axis=2),
                      BufferSpec("L1.rec0", Kind.RECURRENT, torch.float32, (256,))), MAX)
FP = Fingerprint(weights="w0", dtype="float32", layout=LAYOUT.digest(), device="cpu", versions="t")
CAP = 2048  # bytes of a full capsule at position 16


def make(live: LiveState, position: int, seed: int, parent=None, journal: bool = False):
    g = torch.Generator().manual_seed(seed)
    start = parent.position if parent is not None else 0
    for key, region in live.regions.items():
        if key.startswith("kv."):
            region[start:position] = torch.randn(region[start:position].shape, generator=g)
        else:
            region.copy_(torch.randn(region.shape, generator=g))
    entries = (parent.journal if parent is not None else ()) + (
        JournalEntry(torch.randn(position - start, 8, generator=g).to(live.device), f"s{seed}"),) if journal else ()
    return snapshot(live, fingerprint=FP, position=position, meta={"seed": seed, "position": position},
                  meta_tensors={"rng": torch.arange(4, dtype=torch.uint8) + seed},
                  journal=entries, parent=parent)


def digest(c) -> dict:
    """Everything a capsule holds, by value (KV compacted: segments may be merged by a move)."""
    h = lambda t: (str(t.dtype), tuple(t.shape), hashlib.sha256(  # noqa: E731
        t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    return {"position": c.position, "fp": c.fingerprint.to_dict(), "meta": dict(c.meta),
            "kv": {k: h(c.kv_rows(k)) for k in (c.kv[0].rows if c.kv else ())},
            "state": {k: h(t) for k, t in c.state.items()},
            "meta_tensors": {k: h(t) for k, t in c.meta_tensors.items()},
            "journal": [(e.source, h(e.embeds)) for e in c.journal]}


def tiers_of(store: CapsuleStore) -> dict:
    return {s: store.slot(s).tiers()["current"] for s in store.list()}


def current(policy: TierPolicy, store: CapsuleStore, stream: str):
    """What the engine does before a restore: bring the boundary back, then read it."""
    return policy.fetch(store, store.slot(stream).held_current)


def counters(store: CapsuleStore) -> dict:
    return store.stats()["counters"]


@pytest.fixture
def live():
    return LiveState(LAYOUT)


def test_bytes_by_kind(live):
    # 2 KV buffers x 2 heads x 4 dims x 4 B = 64 B per position; 256 float32 of state; 4 B of rng
    assert make(live, 16, 1).nbytes_by_kind() == {"kv": 16 * 64, "state": 1024, "meta": 4, "journal": 0}
    # the journal counts too: 16 rows of 8 float32
    with_journal = make(live, 16, 1, journal=True)
    assert with_journal.nbytes_by_kind()["journal"] == 16 * 8 * 4
    assert with_journal.nbytes == CAP + 4 + 16 * 8 * 4


def test_lru_moves_device_host_file_and_promotion(live, tmp_path):
    store = CapsuleStore(0, files=TierFiles(tmp_path, LAYOUT))
    pol = TierPolicy(TierConfig(device_bytes=2 * CAP + 100, host_bytes=2 * CAP + 100))
    originals = {}
    for i in range(5):
        pol.create(store, f"s{i}")
        originals[f"s{i}"] = digest(c := make(live, 16, i))
        pol.commit(store, f"s{i}", c)
    # s0 (least recently used) went to host and on to the file tier; s1, s2 to host
    assert tiers_of(store) == {"s0": "file", "s1": "host", "s2": "host", "s3": "device", "s4": "device"}
    st = store.stats()
    assert st["counters"]["moves_by_path"] == {"device->host": 3, "host->file": 1}
    assert st["counters"]["moves"] == 4 and st["counters"]["promotions"] == 0
    assert st["tiers"]["device"]["capsules"] == 2 and st["tiers"]["host"]["capsules"] == 2
    store.files.flush()   # demotions are written behind, on the tier's I/O thread
    assert st["tiers"]["file"]["capsules"] == 1 and len(list(tmp_path.glob("tier-*"))) == 1
    assert st["tiers"]["device"]["bytes"] <= 2 * CAP + 100 and st["tiers"]["host"]["bytes"] <= 2 * CAP + 100
    # positions are answered without bringing anything back
    assert store.position("s0") == 16 and counters(store)["promotions"] == 0
    # reading never moves bytes: a capsule in a file is refused until promoted
    with pytest.raises(CapsuleNotInMemory):
        store.current("s0")
    assert counters(store)["promotions"] == 0

    # the policy brings s0 back from the file (byte-exact); the LRU device capsule (s3) makes room
    assert digest(current(pol, store, "s0")) == originals["s0"]
    assert tiers_of(store) == {"s0": "device", "s1": "file", "s2": "host", "s3": "host", "s4": "device"}
    tc = counters(store)
    assert tc["promotions_by_path"] == {"file->device": 1}
    assert tc["moves_by_path"] == {"device->host": 4, "host->file": 2}
    # every capsule is still intact wherever it went
    for s in store.list():
        assert digest(current(pol, store, s)) == originals[s]
    assert store.files.flush(timeout=60)
    assert not list(tmp_path.glob(".*.tmp"))


def test_pinned_never_move_and_history_is_evicted_first(live):
    # no file tier: past the host tier, history entries are dropped (oldest first)
    store = CapsuleStore(3)
    pol = TierPolicy(TierConfig(device_bytes=2 * CAP + 100, host_bytes=CAP + 100))
    pol.create(store, "p")
    pol.commit(store, "p", make(live, 16, 100))
    store.pin("p")
    pol.create(store, "a")
    caps = []
    for i in range(4):
        caps.append(make(live, 16, i))
        pol.commit(store, "a", caps[-1])
    slot = store.slot("a")
    # the pinned stream stayed on the device throughout
    assert store.slot("p").tiers()["current"] == "device"
    st = store.stats()
    # p's capsule is the least recently used, but pinned: a's older boundaries moved instead.
    # Each commit pushed one of a's boundaries to host, whose budget holds one: the oldest
    # history entry was dropped (twice), leaving the newest history entry.
    assert st["counters"]["evictions"] == 2
    assert st["counters"]["moves_by_path"] == {"device->host": 3}
    assert slot.tiers() == {"current": "device", "history": ["host"], "base": None}
    assert [digest(c) for c in slot.history] == [digest(caps[2])]
    assert st["tiers"]["host"]["bytes"] <= CAP + 100
    # rollback lands on the right boundary; bringing it back promotes it
    store.rollback("a", 1)
    assert digest(current(pol, store, "a")) == digest(caps[2])
    assert counters(store)["promotions_by_path"] == {"host->device": 1}
    assert store.slot("p").tiers()["current"] == "device"


def test_refused_when_only_current_boundaries_remain(live):
    store = CapsuleStore(0)
    pol = TierPolicy(TierConfig(device_bytes=CAP + 100, host_bytes=CAP + 100))
    for i in range(3):
        pol.create(store, f"s{i}")
    pol.commit(store, "s0", make(live, 16, 0))
    pol.commit(store, "s1", make(live, 16, 1))   # s0 -> host
    before = (store.stats()["tiers"], tiers_of(store), store.position("s2"))
    with pytest.raises(CapsuleBudgetError) as e:
        pol.commit(store, "s2", make(live, 16, 2))
    assert isinstance(e.value, CapsuleError) and capsule_code(e.value.reason) is Code.CAPSULE_BUDGET
    assert "never dropped" in str(e.value)
    assert (store.stats()["tiers"], tiers_of(store), store.position("s2")) == before
    assert store.current("s2") is None and pol.counters["refused"] == 1


@pytest.mark.parametrize("file_tier", [False, True])
def test_oversized_capsule_refused(live, tmp_path, file_tier):
    # with a file tier too: a capsule must fit device or host memory to be restored at all
    store = CapsuleStore(4, files=TierFiles(tmp_path, LAYOUT) if file_tier else None)
    pol = TierPolicy(TierConfig(device_bytes=CAP, host_bytes=CAP))
    pol.create(store, "a")
    with pytest.raises(CapsuleBudgetError, match="larger than every tier budget") as e:
        pol.commit(store, "a", make(live, 40, 1))
    assert capsule_code(e.value.reason) is Code.CAPSULE_BUDGET
    assert store.current("a") is None and store.slot("a").commits == 0
    assert pol.counters["oversized"] == 1
    with pytest.raises(CapsuleBudgetError):
        pol.create(store, "b", base=make(live, 40, 2))
    assert "b" not in store


def test_round_trip_every_tier_with_shared_segments(live, tmp_path):
    """Delta capsules share KV segments; a moved one gets its own compacted copy, byte-exact."""
    store = CapsuleStore(8, files=TierFiles(tmp_path, LAYOUT))
    pol = TierPolicy(TierConfig(device_bytes=10 * CAP, host_bytes=10 * CAP))
    pol.create(store, "a")
    parent, caps = None, []
    for i, pos in enumerate((8, 16, 24)):
        parent = make(live, pos, 10 + i, parent, journal=True)
        caps.append(parent)
        pol.commit(store, "a", parent)
    assert len(caps[-1].kv) == 3 and len(caps[-1].journal) == 3
    # unique storage: 24 KV rows once + 3 states + 3 rng tensors + 3 journal entries of 8x8 float32
    by_kind = {"kv": 24 * 64, "state": 3 * 1024, "meta": 3 * 4, "journal": 3 * 8 * 8 * 4}
    assert store.stats()["tiers"]["device"]["bytes_by_kind"] == by_kind
    assert store.stats()["tiers"]["device"]["bytes"] == sum(by_kind.values())
    want = [digest(c) for c in caps]
    journal_ptrs = {e.embeds.data_ptr() for c in caps for e in c.journal}
    for h in store.held():
        store.demote(h.id, Tier.HOST)
    assert {h.tier for h in store.held()} == {Tier.HOST}
    # host copies are compacted and independent (no shared storage), journal included
    assert store.stats()["tiers"]["host"]["bytes"] == sum(c.nbytes for c in caps)
    assert store.stats()["tiers"]["device"]["bytes"] == 0
    assert not journal_ptrs & {e.embeds.data_ptr() for c in store.capsules() for e in c.journal}
    for h in store.held():
        store.demote(h.id, Tier.FILE)
    assert store.files.flush(timeout=60)   # written behind, on the tier's I/O thread
    assert len(list(tmp_path.glob("tier-*.capsule.safetensors"))) == 3
    assert store.capsules() == []
    # promotion (current, history, rollback) brings them back to the device, contents exact
    assert digest(current(pol, store, "a")) == want[2]
    slot = store.slot("a")
    assert slot.held_history[0] is None    # the empty start is a boundary too
    assert [digest(pol.fetch(store, h)) for h in list(slot.held_history)[1:]] == want[:2]
    store.rollback("a", 2)
    assert digest(current(pol, store, "a")) == want[0]
    tc = counters(store)
    assert tc["promotions_by_path"] == {"file->device": 3}
    assert tc["moves_by_path"] == {"device->host": 3, "host->file": 3}
    assert not list(tmp_path.glob("tier-*"))   # promoted or discarded: tier files removed


def test_default_store_has_no_tiers(live):
    store = CapsuleStore(2)
    pol = TierPolicy(None)
    pol.create(store, "a")
    caps = [make(live, 8 * (i + 1), i) for i in range(4)]
    for c in caps:
        pol.commit(store, "a", c)
    assert store.current("a") is caps[-1] and len(store.slot("a").history) == 2
    assert list(store.slot("a").history) == caps[1:3]
    store.rollback("a", 2)
    assert store.current("a") is caps[1]
    store.fork("a", "b")
    assert store.current("b") is caps[1] and store.slot("b").base is None
    st = store.stats()
    assert st["counters"]["moves"] == 0 and st["tiers"]["device"]["capsules"] == 1
    assert st["capsules"] == 1 and st["bytes"]["state"] == 1024
    store.drop("b")
    assert store.list() == ["a"]


def test_tier_files_write_behind_and_prefetch_take_the_io_off_the_caller(live, tmp_path, monkeypatch):
    import capsule_ros.capsule.tiers as tiers_module
    files = TierFiles(tmp_path, LAYOUT)
    try:
        a, b = make(live, 16, 1), make(live, 16, 2)
        gate = threading.Event()
        real_save = tiers_module.save_capsule

        def held_save(*args, **kwargs):       # the I/O thread's write waits for the test
            assert gate.wait(30)
            return real_save(*args, **kwargs)
        monkeypatch.setattr(tiers_module, "save_capsule", held_save)
        path_a = files.write(a)               # returns at once: the write is behind
        back = files.read(path_a, FP, a.id, torch.device("cpu"))   # not on disk: from memory
        assert digest(back) == digest(a) and files.counters["reads_from_memory"] == 1
        gate.set()
        path_b = files.write(b)
        assert files.flush(timeout=30) and path_a.is_file() and path_b.is_file()
        files.prefetch(path_b, FP, b.id)      # read ahead on the I/O thread
        deadline = time.monotonic() + 30
        while files.counters["prefetches"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        back = files.read(path_b, FP, b.id, torch.device("cpu"))
        assert digest(back) == digest(b)
        assert files.counters["prefetch_hits"] == 1 and files.counters["reads_inline"] == 0
        back = files.read(path_a, FP, a.id, torch.device("cpu"))   # a cold miss: read here
        assert digest(back) == digest(a) and files.counters["reads_inline"] == 1
    finally:
        files.close()


def test_a_failed_write_behind_keeps_the_capsule_in_memory(live, tmp_path, monkeypatch):
    import capsule_ros.capsule.tiers as tiers_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tiers_module, "save_capsule", disk_full)
    files = TierFiles(tmp_path, LAYOUT)
    try:
        c = make(live, 16, 3)
        path = files.write(c)
        assert files.flush(timeout=30)
        assert files.counters["write_failures"] == 1 and not path.exists()
        assert digest(files.read(path, FP, c.id, torch.device("cpu"))) == digest(c)
    finally:
        files.close()
