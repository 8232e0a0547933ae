"""The GPU half of the tier round trip: device (CUDA) -> pinned host -> file -> device, byte-exact.

On CPU, device and host are the same memory, so test_tiers.py cannot show the device/host
distinction; this runs the same scenario with the live state on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from capsule_ros.capsule import CapsuleStore, LiveState
from capsule_ros.capsule.tiers import TierConfig
from test_tiers import CAP, LAYOUT, digest, make, tiers_of

pytestmark = pytest.mark.gpu


def test_round_trip_through_every_tier_on_cuda(tmp_path):
    live = LiveState(LAYOUT, "cuda")
    store = CapsuleStore(0, TierConfig(device_bytes=2 * CAP + 100, host_bytes=2 * CAP + 100,
                                       file_dir=tmp_path, layout=LAYOUT, device="cuda"))
    originals = {}
    for i in range(5):
        store.create(f"s{i}")
        c = make(live, 16, i)
        assert c.state[next(iter(c.state))].device.type == "cuda"
        originals[f"s{i}"] = digest(c)
        store.commit(f"s{i}", c)
    assert tiers_of(store) == {"s0": "file", "s1": "host", "s2": "host", "s3": "device", "s4": "device"}
    for r in store.residents():
        if r.capsule is None:
            continue
        tensors = [*r.capsule.state.values(), *(t for seg in r.capsule.kv for t in seg.rows.values())]
        if r.tier.value == "host":
            assert all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
        elif r.tier.value == "device":
            assert all(t.device.type == "cuda" for t in tensors)
    for name, expected in originals.items():  # access promotes back to the device, unchanged
        capsule = store.current(name)
        assert all(t.device.type == "cuda" for t in capsule.state.values())
        assert digest(capsule) == expected, name
    assert store.stats()["tier_counters"]["promotions"] >= 3
