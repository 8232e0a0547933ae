"""The node's start arguments, as one plain function.

``launch/capsule_ros.launch.py`` wraps this for ``ros2 launch``; tests call it and start the node
in-process with exactly the same arguments (``launch`` itself is not installable here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import NODE_NAME, package_root

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


@dataclass(frozen=True)
class NodeArgs:
    package: str
    executable: str
    name: str
    namespace: str
    params_file: str
    use_sim_time: bool
    log_level: str
    parameters: list = field(default_factory=list)     # what launch_ros.actions.Node takes
    ros_arguments: list = field(default_factory=list)  # what launch_ros.actions.Node takes

    def cli_args(self) -> list[str]:
        """The same start, as rcl command-line arguments (``Node(cli_args=...)``, or a process)."""
        args = ["--ros-args", "--params-file", self.params_file,
                "-p", f"use_sim_time:={'true' if self.use_sim_time else 'false'}",
                "--log-level", self.log_level]
        if self.namespace:
            args += ["-r", f"__ns:={self.namespace}"]
        return args


def default_params_file() -> str:
    return str(package_root() / "config" / "default.yaml")


def node_arguments(params_file: str = "", namespace: str = "", log_level: str = "info",
                   use_sim_time: bool | str = False) -> NodeArgs:
    """Validate the launch arguments and build the node's start arguments."""
    if isinstance(use_sim_time, str):
        if use_sim_time.lower() not in ("true", "false"):
            raise ValueError(f"use_sim_time must be true or false, not {use_sim_time!r}")
        use_sim_time = use_sim_time.lower() == "true"
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, not {log_level!r}")
    params_file = params_file or default_params_file()
    if not Path(params_file).is_file():
        raise FileNotFoundError(f"params_file {params_file} does not exist")
    if namespace and not namespace.startswith("/"):
        namespace = "/" + namespace
    return NodeArgs(package="capsule_ros", executable="capsule_node", name=NODE_NAME,
                    namespace=namespace, params_file=params_file, use_sim_time=use_sim_time,
                    log_level=log_level,
                    parameters=[params_file, {"use_sim_time": use_sim_time}],
                    ros_arguments=["--log-level", log_level])
