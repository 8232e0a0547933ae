"""What the node compiles, and what Triton tunes, is kept under $ROS_HOME/capsule_ros/
(runtime/build.persistent_compile_caches), so a restart neither compiles nor tunes again."""
from __future__ import annotations

import os

from capsule_ros.runtime.build import persistent_compile_caches


def test_caches_and_tuned_choices_live_under_ros_home(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    chosen = persistent_compile_caches(str(tmp_path))
    root = tmp_path / "capsule_ros"
    assert chosen == {"TRITON_CACHE_DIR": str(root / "triton"),
                      "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
                      "TRITON_CACHE_AUTOTUNING": "1"}
    assert os.environ == chosen  # set for the kernels this process defines from here on


def test_what_the_operator_set_wins(tmp_path, monkeypatch):
    mine = {"TRITON_CACHE_DIR": "/data/triton", "TRITON_CACHE_AUTOTUNING": "0"}
    monkeypatch.setattr(os, "environ", dict(mine))
    chosen = persistent_compile_caches(str(tmp_path))
    assert {k: chosen[k] for k in mine} == mine
    assert chosen["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "capsule_ros" / "inductor")
