"""The launch file's argument function, and a node started with exactly its arguments.

`node_arguments` is the one place that validates the launch arguments and builds the node's
start; the launch file wraps it, in-process tests use `NodeArgs.cli_args()`. `ros2 launch` itself
runs in test_cli.py (the real Jazzy tools overlay); these tests need no overlay.
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
    assert (args.autostart, args.respawn, args.respawn_delay, args.prefix) == (True, False, 2.0, None)
    assert args.parameters == [str(default_params), {"use_sim_time": True, "autostart": True}]
    assert args.cli_args() == ["--ros-args", "--params-file", str(default_params),
                               "-p", "use_sim_time:=true", "-p", "autostart:=true",
                               "--log-level", "debug", "-r", "__ns:=/robot1"]
    with pytest.raises(ValueError, match="log_level"):
        node_arguments(params_file=str(default_params), log_level="loud")
    with pytest.raises(ValueError, match="use_sim_time"):
        node_arguments(params_file=str(default_params), use_sim_time="maybe")
    with pytest.raises(FileNotFoundError):
        node_arguments(params_file=str(tmp_path / "missing.yaml"))


def test_node_arguments_lifecycle_and_process_options(default_params):
    """Launch passes strings: autostart goes to the node as a parameter; respawn, its delay
    and the prefix go to the process manager, not to the node's command line."""
    args = node_arguments(params_file=str(default_params), autostart="False", respawn="true",
                          respawn_delay="0.5", launch_prefix=" /opt/venv/bin/python3 ")
    assert (args.autostart, args.respawn, args.respawn_delay, args.prefix) == \
        (False, True, 0.5, "/opt/venv/bin/python3")
    assert args.parameters[1] == {"use_sim_time": False, "autostart": False}
    assert "autostart:=false" in args.cli_args()
    assert not any("respawn" in a or "python3" in a for a in args.cli_args())
    for bad in ({"autostart": "yes"}, {"respawn": "1"}, {"respawn_delay": "soon"},
                {"respawn_delay": "-1"}, {"respawn_delay": "nan"}, {"launch_prefix": "gdb '"}):
        (name,) = bad
        with pytest.raises(ValueError, match=name):
            node_arguments(params_file=str(default_params), **bad)


def test_launch_file_declares_the_arguments_it_passes(package_root):
    """The launch file declares exactly the arguments node_arguments takes (parsed, not run)."""
    tree = ast.parse((package_root / "launch" / "capsule_ros.launch.py").read_text())
    declared = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"}
    assert declared == {"params_file", "namespace", "log_level", "use_sim_time", "autostart",
                        "respawn", "respawn_delay", "launch_prefix"}
    called = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", "") == "node_arguments"]
    assert len(called) == 1 and {k.arg for k in called[0].keywords} == declared


@pytest.mark.ros
@pytest.mark.timeout(120)
def test_node_starts_with_the_launch_arguments(default_params):
    import rclpy  # noqa: F401 - a missing rclpy fails here, it never skips
    from capsule_ros.ros.node import CapsuleNode
    from rosutil import activate, ros_context

    args = node_arguments(params_file=str(default_params), namespace="robot1", use_sim_time=True,
                          autostart=False)
    with ros_context() as ctx:
        node = CapsuleNode(context=ctx, cli_args=args.cli_args())
        try:
            assert node.get_namespace() == "/robot1"
            assert node.get_fully_qualified_name() == "/robot1/capsule_node"
            assert node.get_parameter("use_sim_time").value is True
            assert node.get_parameter("autostart").value is False
            activate(node)   # what autostart does under `ros2 launch` (test_cli.py)
            assert set(node.config.streams) == {"front", "wrist"}
            topics = {name for name, _ in node.get_publisher_names_and_types_by_node(
                "capsule_node", "/robot1")}
            assert {"/robot1/capsule_node/actions", "/robot1/capsule_node/status"} <= topics
        finally:
            node.destroy_node()
