"""The robot's pin set (requirements-thor.txt) stays consistent with the x86 pins, and
scripts/thor_setup.sh --dry-run shows the steps a Thor needs without changing this machine."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Deliberate differences, each with its reason (docs/THOR.md):
ROBOT_ONLY = {
    "flash-linear-attention", "fla-core", "einops",   # x86 GPU runs get them from gpu_wheels.sh
}
DIFFERENT_VERSION = {"numpy"}   # robot: 1.x (apt's Jazzy messages are built on NumPy 1.26)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            out[norm(name)] = version
    return out


def test_every_robot_pin_matches_the_x86_pin():
    robot = pins(REPO / "requirements-thor.txt")
    x86 = pins(REPO / "constraints.txt")
    for name, version in robot.items():
        if name in ROBOT_ONLY or name in DIFFERENT_VERSION:
            continue
        assert name in x86, f"{name} is pinned for the robot but not in constraints.txt"
        assert version == x86[name], f"{name}: robot {version}, x86 {x86[name]}"
    assert set(ROBOT_ONLY) <= set(robot)


def test_the_deliberate_differences():
    robot = pins(REPO / "requirements-thor.txt")
    x86 = pins(REPO / "constraints.txt")
    assert robot["numpy"].startswith("1."), robot["numpy"]
    assert x86["numpy"].startswith("2."), x86["numpy"]
    assert robot["transformers"] == x86["transformers"] == "5.24.0"
    # torch and the ROS packages never come from this file: the cu130 index and apt.
    assert "torch" not in robot and "triton" not in robot
    assert not [n for n in robot if n.startswith("ros-")]


def test_kernel_and_torch_versions_agree_with_the_x86_gpu_path():
    robot = pins(REPO / "requirements-thor.txt")
    wheels = (REPO / "scripts" / "gpu_wheels.sh").read_text()
    for name in ("flash-linear-attention", "fla-core"):
        assert f"{name}=={robot[name]}" in wheels, name
    setup = (REPO / "scripts" / "thor_setup.sh").read_text()
    torch_x86 = pins(REPO / "constraints.txt")["torch"]          # 2.13.0+cpu
    assert f"TORCH_VERSION={torch_x86.split('+')[0]}" in setup
    mamba = re.search(r"mamba-ssm==([\w.]+)", wheels).group(1)
    assert f"mamba_ssm-{mamba}-py3-none-any.whl" in setup


def dry_run(tmp_path: Path) -> tuple[int, str]:
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "thor_setup.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAPSULE_VENV": str(venv)})
    return proc.returncode, proc.stdout + proc.stderr


def test_thor_setup_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path):
    rc, out = dry_run(tmp_path)
    assert rc == 0, out
    venv = tmp_path / "venv"
    expected_in_order = [
        "rosdep install --from-paths",
        f"python3 -m venv --system-site-packages {venv}",
        f"touch {venv}/COLCON_IGNORE",
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130",
        "pip install -r " + str(REPO / "requirements-thor.txt"),
        "numpy<2",
        "gpu_wheels.sh",
        "mamba_ssm-2.3.2.post1-py3-none-any.whl",
        "TRITON_PTXAS",
        "colcon build --paths",
        "capsule_ros.doctor --device cuda",
        "dry run: nothing was changed",
    ]
    pos = -1
    for text in expected_in_order:
        found = out.find(text, pos + 1)
        assert found > pos, f"{text!r} missing or out of order in:\n{out}"
        pos = found
    # Where it cannot proceed on this machine it says so, and goes on printing.
    if not Path("/opt/ros/jazzy/setup.bash").exists():
        assert "WOULD STOP HERE: /opt/ros/jazzy/setup.bash missing" in out
    assert not venv.exists(), "a dry run created the venv"
    # Idempotent in what it plans: a second dry run plans the same steps.
    assert dry_run(tmp_path) == (rc, out)
