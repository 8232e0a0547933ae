"""Shared fixtures. Tests import the installed package (see Makefile); config/ and test/data
come from the checkout."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def package_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_bag() -> Path:
    return REPO / "test" / "data" / "demo_bag"


@pytest.fixture(scope="session")
def default_params() -> Path:
    return REPO / "config" / "default.yaml"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~50x faster than two contended
    ones (OpenMP spin-waits). Restored afterwards for other test modules."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ros(monkeypatch):
    """An rclpy context on its own ROS domain, localhost only, shut down after the test."""
    import os
    import random
    import time

    from rosutil import ros_context
    domain = random.Random(os.getpid() * 7919 + time.monotonic_ns()).randint(1, 100)
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with ros_context(domain) as ctx:
        yield ctx
