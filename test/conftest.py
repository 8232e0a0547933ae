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


@pytest.fixture(scope="session")
def diagnostic_updater_path(tmp_path_factory) -> str | None:
    """Where the real Jazzy ``diagnostic_updater`` (pure Python) imports from: None when it
    already imports (apt, or scripts/tools_env.sh), else its copy from the tools archive beside
    the checkout (``CAPSULE_TOOLS_ARCHIVE`` overrides), extracted to a temp dir. Skips when the
    archive is not there; fails instead under CI=true, where it must be."""
    import importlib.util
    import os
    import tarfile

    try:
        if importlib.util.find_spec("diagnostic_updater") is not None:
            return None
    except ValueError:  # blocked in sys.modules by a test: look for the archive's copy
        pass
    archive = Path(os.environ.get("CAPSULE_TOOLS_ARCHIVE")
                   or REPO.parent / "shared" / "third_party" / "ros2_jazzy_tools.tar.gz")
    if not archive.is_file():
        why = f"diagnostic_updater is not importable and {archive} is not beside the checkout"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI=true: the diagnostic_updater tests must run)")
        pytest.skip(why)
    prefix = "ros2_jazzy_tools/diagnostics/diagnostic_updater/"
    dest = tmp_path_factory.mktemp("diagnostic_updater")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)]
        if not members:
            pytest.fail(f"{archive} holds no {prefix}")
        tar.extractall(dest, members=members, filter="data")
    return str(dest / "ros2_jazzy_tools" / "diagnostics")


@pytest.fixture
def ros_cli(request, tmp_path, monkeypatch):
    """The real ros2 CLI for one test (test/rostools.py): its own ROS domain and namespace, every
    child process group killed at the end. Skips when the tools archive is not beside the
    checkout; with CI=true that is a failure instead."""
    from rostools import RosCli, tools_env
    cli = RosCli.create(tools_env(), tmp_path, request.node.name)
    # the test's own rclpy (rostools.Feeder) joins the same domain, localhost only
    monkeypatch.setenv("ROS_DOMAIN_ID", str(cli.domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    try:
        yield cli
    finally:
        cli.close()
