#!/usr/bin/env bash
# Set up capsule_ros on a Jetson AGX Thor (JetPack 7, Ubuntu 24.04, ROS 2 Jazzy from apt).
# Idempotent: each step checks first and does only what is missing. docs/THOR.md explains why.
#   scripts/thor_setup.sh [--dry-run] [--no-doctor]
#   CAPSULE_VENV=DIR   the venv (default ~/.venvs/capsule_ros; outside the source tree, so CMake
#                      accepts NumPy's include path from it)
#   TORCH_INDEX=URL    where torch comes from (default PyTorch's cu130 index)
#   CAPSULE_KEEP_TORCH=1  keep a CUDA torch the system already has (NGC container, NVIDIA's
#                      Jetson wheel) instead of installing the cu130 one
# --dry-run prints every step it would take on this machine, changes nothing, exits 0.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTRO=jazzy
ROS_SETUP="/opt/ros/$DISTRO/setup.bash"
VENV="${CAPSULE_VENV:-$HOME/.venvs/capsule_ros}"
TORCH_VERSION=2.13.0              # = constraints.txt's torch (test/test_thor_pins.py)
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu130}"
CUDA_PTXAS=/usr/local/cuda/bin/ptxas
DRY=0; DOCTOR=1
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        --no-doctor) DOCTOR=0 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done

N=0
step() { N=$((N + 1)); echo "[thor-setup] step $N: $*"; }
note() { echo "[thor-setup]   $*"; }
# run CMD...: print it; execute unless --dry-run.
run() {
    echo "[thor-setup]   \$ $*"
    if [ "$DRY" = 0 ]; then "$@"; fi
}
# fatal MSG: stop (a dry run reports it and goes on, so every step is shown).
fatal() {
    if [ "$DRY" = 1 ]; then note "WOULD STOP HERE: $*"; else echo "[thor-setup] ERROR: $*" >&2; exit 1; fi
}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
VPY="$VENV/bin/python"

step "platform"
arch=$(uname -m)
note "machine $arch, $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), python3 $(python3 -c 'import platform;print(platform.python_version())' 2>/dev/null || echo missing)"
if [ -r /etc/nv_tegra_release ]; then note "L4T: $(head -1 /etc/nv_tegra_release)"; else note "no /etc/nv_tegra_release: not a Jetson"; fi
[ "$arch" = aarch64 ] || fatal "this is for a Jetson Thor (aarch64); on $arch use 'make setup'"

step "ROS 2 $DISTRO from apt"
if [ -r "$ROS_SETUP" ]; then
    note "present: $ROS_SETUP"
else
    fatal "$ROS_SETUP missing: install ROS 2 Jazzy (ros-jazzy-ros-base) from the ROS apt repository first (docs/THOR.md, step 2)"
fi

step "apt tools: python3-venv, rosdep, colcon"
missing=""
for pkg in python3-venv python3-pip python3-rosdep python3-colcon-common-extensions; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then run $SUDO apt-get install -y $missing; else note "installed"; fi

step "rosdep: the ROS keys in package.xml (torch is deliberately not one of them)"
if [ ! -e /etc/ros/rosdep/sources.list.d/20-default.list ]; then run $SUDO rosdep init; else note "rosdep initialised"; fi
run rosdep update --rosdistro "$DISTRO"
run rosdep install --from-paths "$ROOT" --ignore-src -y --rosdistro "$DISTRO"

step "venv with system site packages (rclpy and the messages stay the apt ones): $VENV"
if [ -x "$VPY" ]; then
    note "exists ($("$VPY" --version 2>&1))"
else
    run python3 -m venv --system-site-packages "$VENV"
fi
# colcon must not crawl into the venv (the ROS 2 docs' way for a venv in a workspace).
if [ -e "$VENV/COLCON_IGNORE" ]; then note "$VENV/COLCON_IGNORE present"; else run touch "$VENV/COLCON_IGNORE"; fi

step "torch $TORCH_VERSION from $TORCH_INDEX (sm_110 kernels; never PyPI's aarch64 wheel, never rosdep)"
if [ "${CAPSULE_KEEP_TORCH:-}" = 1 ] && [ -x "$VPY" ] && "$VPY" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    note "keeping the system's torch (CAPSULE_KEEP_TORCH=1): $("$VPY" -c 'import torch;print(torch.__version__, "CUDA", torch.version.cuda)')"
elif [ -x "$VPY" ] && "$VPY" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') and (torch.version.cuda or '').startswith('13') else 1)" 2>/dev/null; then
    note "installed: $("$VPY" -c 'import torch;print(torch.__version__, "CUDA", torch.version.cuda)')"
else
    run "$VPY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
fi

step "pinned Python dependencies (requirements-thor.txt: numpy<2 for apt's Jazzy messages)"
run "$VPY" -m pip install -r "$ROOT/requirements-thor.txt" -c "$ROOT/requirements-thor.txt"
if [ "$DRY" = 0 ]; then
    "$VPY" -c "import numpy,sys; sys.exit(0 if numpy.__version__.startswith('1.') else 'numpy %s: must be <2 here' % numpy.__version__)"
else
    note "then check: numpy<2 in the venv (apt's Jazzy messages are built against NumPy 1.26)"
fi

step "mamba-ssm, Triton-only build (no aarch64 binaries; scripts/gpu_wheels.sh makes it)"
if [ -x "$VPY" ] && "$VPY" -c "import mamba_ssm" 2>/dev/null; then
    note "installed: mamba_ssm $("$VPY" -c 'import mamba_ssm;print(mamba_ssm.__version__)')"
else
    # its python3 must be the venv's (torch is needed to read mamba-ssm's sdist metadata)
    run bash -c "PATH='$VENV/bin':\$PATH bash '$ROOT/scripts/gpu_wheels.sh'"
    run "$VPY" -m pip install --no-deps "$ROOT"/.whl/mamba_ssm-2.3.2.post1-py3-none-any.whl
fi

step "Triton's ptxas for sm_110 (Triton < 3.7 bundles a ptxas that rejects sm_110a)"
marker="# capsule_ros: Triton ptxas for Thor"
if grep -qF "$marker" "$VENV/bin/activate" 2>/dev/null; then
    note "already in $VENV/bin/activate"
else
    note "append to $VENV/bin/activate: TRITON_PTXAS_BLACKWELL_PATH / TRITON_PTXAS_THOR_PATH=$CUDA_PTXAS (if unset)"
    if [ "$DRY" = 0 ]; then
        printf '\n%s\nif [ -x %s ]; then\n  export TRITON_PTXAS_BLACKWELL_PATH="${TRITON_PTXAS_BLACKWELL_PATH:-%s}"\n  export TRITON_PTXAS_THOR_PATH="${TRITON_PTXAS_THOR_PATH:-%s}"\nfi\n' \
            "$marker" "$CUDA_PTXAS" "$CUDA_PTXAS" "$CUDA_PTXAS" >> "$VENV/bin/activate"
    fi
fi

step "colcon build (ROS underlay + venv python; interfaces built against the venv's NumPy 1.x)"
for d in build install log; do
    if [ -e "$ROOT/$d/COLCON_IGNORE" ]; then :; else run mkdir -p "$ROOT/$d"; run touch "$ROOT/$d/COLCON_IGNORE"; fi
done
run bash -c "set +u; . '$ROS_SETUP' && . '$VENV/bin/activate' && cd '$ROOT' && colcon build --paths '$ROOT' --build-base build --install-base install --cmake-args -DPython3_EXECUTABLE='$VPY' -DBUILD_TESTING=OFF"

step "doctor: python -m capsule_ros.doctor --device cuda --params config/default.yaml"
if [ "$DOCTOR" = 1 ]; then
    run bash -c "set +u; . '$ROS_SETUP' && . '$VENV/bin/activate' && . '$ROOT/install/setup.bash' && python -P -m capsule_ros.doctor --device cuda --params '$ROOT/config/default.yaml'"
else
    note "skipped (--no-doctor)"
fi

echo "[thor-setup] done$([ "$DRY" = 1 ] && echo ' (dry run: nothing was changed)'). To run the node:"
echo "    source $ROS_SETUP && source $VENV/bin/activate && source $ROOT/install/setup.bash"
echo "    ros2 launch capsule_ros capsule_ros.launch.py params_file:=/path/params.yaml"
echo "  (in that order: the venv's python3 must come first, capsule_node runs '#!/usr/bin/env python3')"
