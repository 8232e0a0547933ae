"""The ROS side: which distro rclpy is, and whether the messages still load after torch."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

from capsule_ros.doctor import Check

EXPECTED_DISTRO = "jazzy"
# rclpy's major version per distro (Humble 3.x, Iron 4.x, Jazzy 7.x, Kilted 9.x, Rolling 10.x).
RCLPY_MAJOR_TO_DISTRO = {3: "humble", 4: "iron", 7: "jazzy", 9: "kilted", 10: "rolling"}


def install_prefix(site_module_dir: Path) -> Path | None:
    """<prefix>/lib/python3.X/{site,dist}-packages/<pkg> -> <prefix>."""
    parts = site_module_dir.parts
    for i in range(len(parts) - 1, 2, -1):
        if parts[i] in ("site-packages", "dist-packages") and parts[i - 2] == "lib":
            return Path(*parts[: i - 2])
    return None


def module_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def rclpy_version() -> tuple[str | None, str]:
    """(version, where it was read): pip wheel metadata, else the install's package.xml."""
    for dist in ("ros-rclpy", "rclpy"):
        try:
            return importlib.metadata.version(dist), f"pip distribution {dist}"
        except importlib.metadata.PackageNotFoundError:
            pass
    pkg = module_dir("rclpy")
    prefix = install_prefix(pkg) if pkg else None
    xml = prefix / "share" / "rclpy" / "package.xml" if prefix else None
    if xml and xml.is_file():
        m = re.search(r"<version>([^<]+)</version>", xml.read_text())
        if m:
            return m.group(1).strip(), str(xml)
    return None, "not found"


def check_distro() -> Check:
    if importlib.util.find_spec("rclpy") is None:
        return Check("rclpy_distro", "fail", "rclpy is not importable: source "
                     f"/opt/ros/{EXPECTED_DISTRO}/setup.bash (and use a venv made with "
                     "--system-site-packages)")
    version, source = rclpy_version()
    env_distro = os.environ.get("ROS_DISTRO", "")
    distro = None
    if version and version.split(".")[0].isdigit():
        distro = RCLPY_MAJOR_TO_DISTRO.get(int(version.split(".")[0]))
    facts = {"rclpy": version, "source": source, "ROS_DISTRO": env_distro, "distro": distro}
    if distro is None:
        return Check("rclpy_distro", "warn", f"rclpy {version} ({source}): distro unknown, "
                     f"ROS_DISTRO={env_distro or 'unset'}; the node is built for {EXPECTED_DISTRO}",
                     facts)
    if env_distro and env_distro != distro:
        return Check("rclpy_distro", "warn", f"ROS_DISTRO={env_distro} but rclpy {version} is "
                     f"{distro}: two ROS installs are mixed on the path", facts)
    if distro != EXPECTED_DISTRO:
        return Check("rclpy_distro", "warn", f"rclpy {version} is {distro}; robots run "
                     f"{EXPECTED_DISTRO} and the tests pin it", facts)
    return Check("rclpy_distro", "ok", f"rclpy {version} is {distro} "
                 f"(ROS_DISTRO={env_distro or 'unset'}; read from {source})", facts)


AFTER_TORCH_STEPS = [
    ("import torch", "import torch"),
    ("import sensor_msgs.msg after torch", "import rclpy\nfrom sensor_msgs.msg import Image"),
    ("Image serialize round trip", (
        "from rclpy.serialization import serialize_message, deserialize_message\n"
        "from sensor_msgs.msg import Image\n"
        "m = Image(height=2, width=3, encoding='mono8', step=3, data=bytes(range(6)))\n"
        "back = deserialize_message(serialize_message(m), Image)\n"
        "assert bytes(back.data) == bytes(range(6)), bytes(back.data)\n")),
]


def check_ros_after_torch(probes: bool) -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("ros_after_torch", "skipped", "torch is not installed (see the torch check)")
    if importlib.util.find_spec("sensor_msgs") is None:
        return Check("ros_after_torch", "fail", "sensor_msgs is not importable: source "
                     f"/opt/ros/{EXPECTED_DISTRO}/setup.bash")
    if not probes:
        return Check("ros_after_torch", "skipped", "probes off (they run in a child Python)")
    from capsule_ros.doctor.probe import run_steps
    res = run_steps(AFTER_TORCH_STEPS)
    if res.ok:
        return Check("ros_after_torch", "ok", "torch, then rclpy and sensor_msgs, imported in "
                     "one process; an Image serialised and came back equal")
    return Check("ros_after_torch", "fail", f"step '{res.failed_step}' failed: {res.error}",
                 {"output": res.output[-2000:]})
