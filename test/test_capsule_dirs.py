"""Where capsule files go, who owns them, and what the store holds per stream.

* user ``save``/``load`` use ``saved/``; persistence writes ``streams/<node>/`` and reload reads
  only there: ``save front wrist`` no longer overwrites what ``wrist`` reloads;
* a relative directory resolves against ROS_HOME; a second live owner of a node's directories
  is refused, a restart (the owner gone) takes them over; two node names never share one;
* a disk-full save is a coded failure and the pipeline keeps answering;
* the journal is kept only for what is enabled; compaction never holds a KV row twice.
"""
from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from capsule_ros.capsule import CapsuleError, files
from capsule_ros.capsule.places import CapsuleDirs, node_dir_name, resolve_root
from capsule_ros.config import from_params
from capsule_ros.models.registry import tiny_config
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.pipeline import Pipeline
from capsule_ros.runtime.outcome import Answer, Failure
from capsule_ros.runtime.pipeline import failure_from
from capsule_ros.status_codes import Code

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def params(directory: str) -> dict:
    head = {"kind": "continuous", "horizon": 2, "dof": 2, "step_period": 0.1}
    return {
        "model": {"config_file": str(tiny_config("lfm2")), "seed": 0, "max_context": 128},
        "inputs": {"names": ["arr"],
                   "arr": {"topic": "/arr", "type": "std_msgs/msg/Float32MultiArray",
                           "encoder": "float_array", "length": 3}},
        "streams": {"names": ["front", "wrist"],
                    "front": {"trigger": "arr", "head": head},
                    "wrist": {"trigger": "arr", "head": head}},
        "capsules": {"directory": directory, "persist_on_commit": True, "reload_at_start": True},
    }


def feed(p: Pipeline, value: float) -> list:
    out: list = []
    p.on_message("arr", NS(data=[value, 0.5, 1.0]), 0, out.append)
    return out


def test_names_and_roots(tmp_path):
    assert node_dir_name("/robot1/capsule_node") == "robot1__capsule_node"
    assert node_dir_name("/capsule_node") == "capsule_node"
    assert node_dir_name("/a/b_c") != node_dir_name("/a_b/c")
    with pytest.raises(CapsuleError):
        node_dir_name("/a/../b")
    assert resolve_root("caps", ros_home=tmp_path) == tmp_path.resolve() / "caps"
    assert resolve_root(str(tmp_path / "abs"), ros_home="/elsewhere") == tmp_path / "abs"


def test_owner_lock_refuses_a_second_live_owner(tmp_path):
    dirs = CapsuleDirs.of(tmp_path, "/robot1/capsule_node")
    lock = dirs.claim()
    with pytest.raises(CapsuleError, match="held by another live process"):
        dirs.claim()
    other = CapsuleDirs.of(tmp_path, "/robot2/capsule_node").claim()  # another node: its own dirs
    lock.release()
    dirs.claim().release()   # the owner gone: a restart takes over
    other.release()
    assert dirs.tiers != CapsuleDirs.of(tmp_path, "/robot2/capsule_node").tiers


def test_saved_and_streams_are_apart_and_restart_reloads_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("ROS_HOME", str(tmp_path / "ros_home"))
    p = build_pipeline(from_params(params("caps")), node_name="/robot1/capsule_node")
    root = tmp_path / "ros_home" / "caps"
    try:
        assert all(isinstance(o, Answer) for o in feed(p, 0.1))
        p.persister.flush(60)
        wrist_at = p.engine.store.position("wrist")
        # the user saves front under the name "wrist": a snapshot, not wrist's persisted boundary
        assert Path(p.save("front", "wrist")) == root / "saved" / "wrist.capsule.safetensors"
        assert feed(p, 0.2)  # front and wrist move on
        p.persister.flush(60)
        wrist_after = p.engine.store.position("wrist")
        assert wrist_after > wrist_at
        # a user snapshot named like no stream is not reloaded as a stream
        p.save("front", "snapshot")
    finally:
        p.close()
    streams = root / "streams" / "robot1__capsule_node"
    assert files.list_capsules(streams) == ["front", "wrist"]
    assert files.list_capsules(root / "saved") == ["snapshot", "wrist"]

    again = build_pipeline(from_params(params("caps")), node_name="/robot1/capsule_node")
    try:
        assert again.engine.store.position("wrist") == wrist_after   # not the user's snapshot
        assert sorted(again.engine.store.list()) == ["front", "wrist"]
        assert again.load("replica", "wrist") == wrist_at              # saved/ is for load
    finally:
        again.close()


def test_disk_full_save_is_coded_and_the_pipeline_keeps_serving(tmp_path, monkeypatch):
    p = build_pipeline(from_params(params(str(tmp_path))), node_name="/capsule_node")
    try:
        feed(p, 0.1)
        p.save("front", "keep")
        before = (tmp_path / "saved" / "keep.capsule.safetensors").read_bytes()
        feed(p, 0.2)

        def full(tmp, data, pause=None):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(files, "_write_tmp", full)
        with pytest.raises(CapsuleError) as e:
            p.save("front", "keep")
        assert failure_from("front", 0, e.value).code is Code.CAPSULE_REFUSED
        assert "No space left" in str(e.value)
        assert (tmp_path / "saved" / "keep.capsule.safetensors").read_bytes() == before
        out = feed(p, 0.3)       # persistence fails too (counted), queries go on
        assert any(isinstance(o, Answer) for o in out) and not any(isinstance(o, Failure) for o in out)
        p.persister.flush(60)
        assert p.persister.stats()["failed"] >= 1
    finally:
        monkeypatch.undo()
        p.close()


def _model():
    from capsule_ros.models.hybrid import HybridModel, ModelSpec
    return HybridModel.load(ModelSpec(config_file=str(tiny_config("lfm2")), max_len=128))


def test_journal_only_for_what_is_enabled():
    m = _model()
    x = lambda n: torch.randn(n, m.hidden_size, generator=torch.Generator().manual_seed(n))  # noqa: E731
    for kwargs, kept in (({"context_policy": "reset"}, 0), ({"context_policy": "rebase", "rebase_window": 2}, 2),
                         ({"context_policy": "reset", "verify_every": 100}, 5)):
        e = Engine(m, chunk_size=8, **kwargs)
        e.add_stream("a")
        for n in (3, 4, 5, 6, 7):
            e.query("a", x(n), act=lambda h: None)
            e.commit()
        cap = e.boundary("a")
        assert len(cap.journal) == kept, kwargs
        assert e.store.stats()["bytes"]["journal"] == sum(  # counted, each entry once
            {id(j.embeds): j.nbytes for c in e.store.capsules() for j in c.journal}.values())


def test_compaction_never_holds_a_row_twice():
    m = _model()
    e = Engine(m, chunk_size=8, history_depth=2, max_segments=4)
    e.add_stream("a")
    for i in range(12):
        e.query("a", torch.randn(2, m.hidden_size, generator=torch.Generator().manual_seed(i)),
                act=lambda h: None)
        e.commit()
        while e.idle_step() is not None:   # what the worker does between queries
            pass
    cap = e.boundary("a")
    assert len(cap.kv) <= 4 and e.store.stats()["counters"]["compactions"] >= 1
    assert e.counters["idle_compactions"] >= 1
    # every KV row of the stream (current + history share the prefix) held exactly once
    assert e.store.stats()["bytes"]["kv"] == cap.position * m.live.layout.kv_row_bytes()
    history = [c for c in e.store.slot("a").history if c is not None]
    for h in history:   # history entries still hold exactly their own rows
        assert h.position < cap.position and sum(s.stop - s.start for s in h.kv) == h.position


def test_a_node_that_never_idles_still_compacts_past_the_hard_limit():
    m = _model()
    e = Engine(m, chunk_size=8, history_depth=2, max_segments=4)
    e.add_stream("a")
    longest = 0
    for i in range(40):      # no idle_step ever: commits compact only past 4 x max_segments
        e.query("a", torch.randn(1, m.hidden_size, generator=torch.Generator().manual_seed(i)),
                act=lambda h: None)
        e.commit()
        longest = max(longest, len(e.boundary("a").kv))
    assert longest <= 4 * e.store.compact_hard_factor + 1
    assert e.store.stats()["counters"]["compactions"] >= 1 and e.counters["idle_compactions"] == 0

