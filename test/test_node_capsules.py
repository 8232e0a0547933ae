"""The ~/capsule service's file verbs and persistence across a node restart."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from capsule_ros.srv import CapsuleOp  # noqa: E402
from rosutil import spin_until  # noqa: E402
from test_node import Harness, capsule_hashes, running_node  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]


def params_with(default_params: Path, tmp_path: Path, **capsules) -> Path:
    doc = yaml.safe_load(default_params.read_text())
    section = doc["/**/capsule_node"]["ros__parameters"]
    section["capsules"].update(capsules)
    # relative config paths resolve against the package; keep the model config absolute
    section["model"]["config_file"] = str(default_params.parent / "models" / "default_qwen3_5.json")
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def call(h: Harness, op: str, stream: str = "", target: str = "") -> CapsuleOp.Response:
    client = h.client.create_client(CapsuleOp, f"{h.node.get_fully_qualified_name()}/capsule")
    spin_until(h.ex, client.service_is_ready, 20, "capsule service")
    future = client.call_async(CapsuleOp.Request(op=op, stream=stream, target=target))
    spin_until(h.ex, future.done, 30, f"~/capsule {op}")
    return future.result()


def test_save_load_refusals_and_reload_after_restart(default_params, tmp_path):
    store_dir = tmp_path / "capsules"
    saved_dir = store_dir / "saved"                   # user save/load names
    streams_dir = store_dir / "streams" / "capsule_node"  # what persistence writes for this node
    params = params_with(default_params, tmp_path, directory=str(store_dir),
                         persist_on_commit=True, reload_at_start=True)
    with running_node(params) as h:
        h.trigger("front", 0)
        h.trigger("front", 1)
        saved = call(h, "save", "front", "front_snapshot")
        assert saved.ok, saved.message
        assert (saved_dir / "front_snapshot.capsule.safetensors").is_file()
        before = capsule_hashes(h.node.pipeline.engine)

        bad = call(h, "save", "front", "../escape")
        assert not bad.ok and bad.code == 400 and "invalid" in bad.message
        corrupt = saved_dir / "broken.capsule.safetensors"
        data = bytearray((saved_dir / "front_snapshot.capsule.safetensors").read_bytes())
        data[-100] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        refused = call(h, "load", "front", "broken")
        assert not refused.ok and refused.code == 400, refused.message
        missing = call(h, "load", "front", "no_such_capsule")
        assert not missing.ok and missing.code == 401, missing.message
        assert capsule_hashes(h.node.pipeline.engine) == before

        loaded = call(h, "load", "replica", "front_snapshot")  # a new, queryable stream
        assert loaded.ok, loaded.message
        assert "replica at 34" in loaded.message
        position = h.node.pipeline.engine.store.position("front")
    assert (streams_dir / "front.capsule.safetensors").is_file()

    with running_node(params) as h:
        assert h.node.pipeline.engine.store.position("front") == position == 34
        assert h.node.pipeline.engine.store.position("wrist") == 0
        h.trigger("front", 2)
        assert h.actions[-1].boundary == 34 + 17
