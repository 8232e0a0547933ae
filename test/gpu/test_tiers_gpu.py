"""The GPU half of the tier round trip: device (CUDA) -> pinned host -> file -> device, byte-exact.

On CPU, device and host are the same memory, so test_tiers.py cannot show the device/host
distinction; this runs the same scenario with the live state on CUDA. A capsule demoted to host
takes its journal along: nothing of it stays in device memory.
"""
from __future__ import annotations

import pytest

from capsule_ros.capsule import CapsuleStore, LiveState
from capsule_ros.capsule.tiers import TierFiles, tensors_of
from capsule_ros.runtime.tier_policy import TierConfig, TierPolicy
from test_tiers import CAP, LAYOUT, digest, make, tiers_of

pytestmark = pytest.mark.gpu


def test_round_trip_through_every_tier_on_cuda(tmp_path):
    live = LiveState(LAYOUT, "cuda")
    store = CapsuleStore(0, device="cuda", pin_host=True, files=TierFiles(tmp_path, LAYOUT))
    journal = 16 * 8 * 4
    pol = TierPolicy(TierConfig(device_bytes=2 * (CAP + journal) + 100,
                                host_bytes=2 * (CAP + journal) + 100))
    originals = {}
    for i in range(5):
        pol.create(store, f"s{i}")
        c = make(live, 16, i, journal=True)
        assert all(t.device.type == "cuda" for t in [*c.state.values(), c.journal[0].embeds])
        originals[f"s{i}"] = digest(c)
        pol.commit(store, f"s{i}", c)
    assert tiers_of(store) == {"s0": "file", "s1": "host", "s2": "host", "s3": "device", "s4": "device"}
    for h in store.held():
        if h.capsule is None:
            continue
        tensors = [t for t in tensors_of(h.capsule) if t.numel() and t is not h.capsule.meta_tensors.get("rng")]
        if h.tier.value == "host":
            assert all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
        elif h.tier.value == "device":
            assert all(t.device.type == "cuda" for t in tensors)
    assert store.stats()["tiers"]["host"]["bytes_by_kind"]["journal"] == 2 * journal
    for name, expected in originals.items():  # the policy brings each back to the device, unchanged
        capsule = pol.fetch(store, store.slot(name).held_current)
        assert all(t.device.type == "cuda" for t in capsule.state.values())
        assert digest(capsule) == expected, name
    assert store.stats()["counters"]["promotions"] >= 3
