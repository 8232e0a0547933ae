"""The colcon build works: the package and its generated interfaces import from install/."""
import os

import pytest


def test_package_resolves_to_install_tree():
    import capsule_ros

    path = os.path.realpath(capsule_ros.__file__)
    assert f"{os.sep}install{os.sep}" in path, (
        f"capsule_ros imported from {path}, not the colcon install tree; "
        "source scripts/env.sh and run pytest via the venv's pytest executable")


def test_status_constants_match_the_codes_the_node_publishes():
    """Status.msg's constants (what a client compares against) and status_codes.Code (what the
    node publishes) are written separately: every code must exist in both with one value."""
    from capsule_ros.msg import Status
    from capsule_ros.status_codes import Code

    generated = {name: getattr(Status, name) for name in dir(Status)
                 if name.isupper() and isinstance(getattr(Status, name), int)}
    assert generated == {c.name: int(c) for c in Code}
