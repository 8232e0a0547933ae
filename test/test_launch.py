"""The launch file's argument function, and a node started with exactly its arguments.

`launch`/`launch_ros` are not installable here (no PyPI wheels), so `ros2 launch` itself is not
run; the launch file is a thin wrapper over `node_arguments`, which these tests exercise.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from capsule_ros.ros.launch_args import node_arguments


def test_node_arguments_validate(tmp_path, default_params):
    args = node_arguments(params_file=str(default_params), namespace="robot1",
                          log_level="debug", use_sim_time="true")
    assert (args.package, args.executable, args.name) == ("capsule_ros", "capsule_node", "capsule_node")
    assert args.namespace == "/robot1" and args.use_sim_time is True
    assert args.parameters == [str(default_params), {"use_sim_time": True}]
    assert args.cli_args() == ["--ros-args", "--params-file", str(default_params),
                               "-p", "use_sim_time:=true", "--log-level", "debug",
                               "-r", "__ns:=/robot1"]
    with pytest.raises(ValueError, match="log_level"):
        node_arguments(params_file=str(default_params), log_level="loud")
    with pytest.raises(ValueError, match="use_sim_time"):
        node_arguments(params_file=str(default_params), use_sim_time="maybe")
    with pytest.raises(FileNotFoundError):
        node_arguments(params_file=str(tmp_path / "missing.yaml"))


def test_launch_file_declares_the_arguments_it_passes(package_root):
    """The launch file declares exactly the arguments node_arguments takes (parsed, not run)."""
    tree = ast.parse((package_root / "launch" / "capsule_ros.launch.py").read_text())
    declared = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"}
    assert declared == {"params_file", "namespace", "log_level", "use_sim_time"}
    called = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", "") == "node_arguments"]
    assert len(called) == 1 and {k.arg for k in called[0].keywords} == declared


@pytest.mark.ros
@pytest.mark.timeout(120)
def test_node_starts_with_the_launch_arguments(default_params):
    rclpy = pytest.importorskip("rclpy")
    from capsule_ros.ros.node import CapsuleNode
    from rosutil import ros_context

    args = node_arguments(params_file=str(default_params), namespace="robot1", use_sim_time=True)
    with ros_context() as ctx:
        node = CapsuleNode(context=ctx, cli_args=args.cli_args())
        try:
            assert node.get_namespace() == "/robot1"
            assert node.get_fully_qualified_name() == "/robot1/capsule_node"
            assert node.get_parameter("use_sim_time").value is True
            assert set(node.config.streams) == {"front", "wrist"}
            topics = {name for name, _ in node.get_publisher_names_and_types_by_node(
                "capsule_node", "/robot1")}
            assert {"/robot1/capsule_node/actions", "/robot1/capsule_node/status"} <= topics
        finally:
            node.destroy_node()
    del rclpy
