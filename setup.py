"""pip-installable Python library `capsule_ros`, for use without colcon.

The ROS build is CMakeLists.txt + package.xml (build_type ament_cmake): colcon builds the
generated interfaces (capsule_ros.msg / capsule_ros.srv) and installs this package next to
them, and never runs this file. When capsule_ros is pip-installed instead, the generated
messages must come from a ROS install where the package has been built.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_here = Path(__file__).resolve().parent
_version = re.search(r"<version>\s*([^<\s]+)\s*</version>",
                     (_here / "package.xml").read_text()).group(1)

setup(
    name="capsule_ros",
    version=_version,
    description="ROS 2 inference node keeping model execution state as per-stream capsules",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["capsule_ros", "capsule_ros.*"]),
    install_requires=["numpy", "pyyaml", "torch", "transformers", "safetensors"],
    extras_require={
        "replay": ["rosbags"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={
        "console_scripts": [
            "capsule_node = capsule_ros.ros.main:main",
            "capsule_replay = capsule_ros.ros.replay:main",
            "capsule_demo = capsule_ros.demo:main",
        ],
    },
)
