"""The node's start arguments, as one plain function.

``launch/capsule_ros.launch.py`` wraps this for ``ros2 launch`` (a ``LifecycleNode`` action), and
in-process tests start the node with exactly the same arguments (:meth:`NodeArgs.cli_args`).
Launch arguments arrive as strings; they are validated and converted here, in one place.
"""
from __future__ import annotations

import shlex
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
    autostart: bool = True          # node parameter: the node configures and activates itself
    respawn: bool = False           # launch: restart the process when it exits
    respawn_delay: float = 2.0      # launch: seconds before a restart
    prefix: str | None = None       # launch: command prefix, e.g. a venv's python on a robot
    parameters: list = field(default_factory=list)     # what launch_ros.actions.Node takes
    ros_arguments: list = field(default_factory=list)  # what launch_ros.actions.Node takes

    def cli_args(self) -> list[str]:
        """The same start, as rcl command-line arguments (``Node(cli_args=...)``, or a process).

        Respawn and prefix belong to the process manager (launch), not to the node.
        """
        args = ["--ros-args", "--params-file", self.params_file,
                "-p", f"use_sim_time:={_bool_text(self.use_sim_time)}",
                "-p", f"autostart:={_bool_text(self.autostart)}",
                "--log-level", self.log_level]
        if self.namespace:
            args += ["-r", f"__ns:={self.namespace}"]
        return args


def default_params_file() -> str:
    return str(package_root() / "config" / "default.yaml")


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def _as_bool(name: str, value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if value.strip().lower() not in ("true", "false"):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value.strip().lower() == "true"


def _as_delay(value: float | str) -> float:
    try:
        delay = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"respawn_delay must be a number of seconds, not {value!r}") from None
    if not delay >= 0.0:   # also refuses nan
        raise ValueError(f"respawn_delay must be >= 0 seconds, not {value!r}")
    return delay


def node_arguments(params_file: str = "", namespace: str = "", log_level: str = "info",
                   use_sim_time: bool | str = False, autostart: bool | str = True,
                   respawn: bool | str = False, respawn_delay: float | str = 2.0,
                   launch_prefix: str = "") -> NodeArgs:
    """Validate the launch arguments and build the node's start arguments."""
    use_sim_time = _as_bool("use_sim_time", use_sim_time)
    autostart = _as_bool("autostart", autostart)
    respawn = _as_bool("respawn", respawn)
    respawn_delay = _as_delay(respawn_delay)
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, not {log_level!r}")
    params_file = params_file or default_params_file()
    if not Path(params_file).is_file():
        raise FileNotFoundError(f"params_file {params_file} does not exist")
    if namespace and not namespace.startswith("/"):
        namespace = "/" + namespace
    prefix = launch_prefix.strip() or None
    if prefix is not None:
        # launch splits the prefix with shlex too; fail here, with the argument's name
        try:
            shlex.split(prefix)
        except ValueError as e:
            raise ValueError(f"launch_prefix {launch_prefix!r} does not parse: {e}") from None
    return NodeArgs(package="capsule_ros", executable="capsule_node", name=NODE_NAME,
                    namespace=namespace, params_file=params_file, use_sim_time=use_sim_time,
                    log_level=log_level, autostart=autostart, respawn=respawn,
                    respawn_delay=respawn_delay, prefix=prefix,
                    # the dict comes after the file, so these override the file's values
                    parameters=[params_file, {"use_sim_time": use_sim_time,
                                              "autostart": autostart}],
                    ros_arguments=["--log-level", log_level])
