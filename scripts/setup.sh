#!/usr/bin/env bash
# Idempotent project setup: venv, pinned pip install, /opt/python symlinks, colcon build.
# Safe to run repeatedly; when nothing changed it only runs colcon's incremental check.
#   PYTHON=python3.11 (interpreter for a new venv)   CAPSULE_SETUP_FORCE_PIP=1 (ignore the stamp)
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.capsule_ros_stamp"
PYTHON="${PYTHON:-python3.11}"
NSTEPS=4
STEP="0/$NSTEPS init"

step() { STEP="$1/$NSTEPS $2"; echo "[setup] $STEP ..."; }
on_err() {
    local rc=$?
    echo "[setup] FAILED at step $STEP (exit $rc, line ${BASH_LINENO[0]}: ${BASH_COMMAND})" >&2
    exit "$rc"
}
trap on_err ERR

ignore_dir() { mkdir -p "$1" && { [ -e "$1/COLCON_IGNORE" ] || : > "$1/COLCON_IGNORE"; }; }

# ---- 1: venv -------------------------------------------------------------------------------
step 1 "venv ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    echo "[setup]   created venv with $("$VENV/bin/python" --version)"
else
    echo "[setup]   exists ($("$VENV/bin/python" --version))"
fi
ignore_dir "$VENV"
# Build with the venv only; never let a previously sourced install tree (env.sh) leak in.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
unset PYTHONHOME

# ---- 2: pip --------------------------------------------------------------------------------
step 2 "pip install -r requirements.txt -c constraints.txt"
want="$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" = "$have" ] && [ -z "${CAPSULE_SETUP_FORCE_PIP:-}" ]; then
    echo "[setup]   up to date (stamp $want)"
else
    "$VENV/bin/python" -m pip install -r requirements.txt -c constraints.txt
    # Fail here, not deep inside colcon, when the CPU torch or ROS wheels are not what we pinned.
    "$VENV/bin/python" - <<'PY'
import torch, rclpy, numpy  # noqa: F401
assert torch.version.cuda is None, f"a CUDA torch build was installed: {torch.__version__}"
print(f"[setup]   torch {torch.__version__} (CPU), numpy {numpy.__version__}")
PY
    echo "$want" > "$STAMP"
fi

# ---- 3: /opt/python symlinks ---------------------------------------------------------------
# The ROS wheels' exported CMake targets carry include paths from the wheel build machine
# (/opt/python/cp311-cp311/...). Point them at this venv's Python and numpy headers.
step 3 "/opt/python/cp311-cp311 include symlinks"
PYINC="$("$VENV/bin/python" -c "import sysconfig;print(sysconfig.get_paths()['include'])")"
NPINC="$("$VENV/bin/python" -c "import numpy,os;print(os.path.join(os.path.dirname(numpy.__file__),'_core','include'))")"
OPTPY=/opt/python/cp311-cp311
link_ok() { [ "$(readlink "$1" 2>/dev/null)" = "$2" ] && [ -e "$1/" ]; }
if link_ok "$OPTPY/include/python3.11" "$PYINC" \
   && link_ok "$OPTPY/lib/python3.11/site-packages/numpy/_core/include" "$NPINC"; then
    echo "[setup]   present"
else
    SUDO=""
    if [ ! -w /opt ] && [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO mkdir -p "$OPTPY/include" "$OPTPY/lib/python3.11/site-packages/numpy/_core"
    $SUDO ln -sfn "$PYINC" "$OPTPY/include/python3.11"
    $SUDO ln -sfn "$NPINC" "$OPTPY/lib/python3.11/site-packages/numpy/_core/include"
    echo "[setup]   created: $OPTPY/include/python3.11 -> $PYINC"
    echo "[setup]   created: $OPTPY/lib/python3.11/site-packages/numpy/_core/include -> $NPINC"
fi

# ---- 4: colcon build -----------------------------------------------------------------------
step 4 "colcon build (build/, install/)"
for d in build install log; do ignore_dir "$ROOT/$d"; done
export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
unset COLCON_PREFIX_PATH
# Python3_NumPy_INCLUDE_DIR: .venv lives inside the package's source dir (the repo root), and
# CMake refuses to export a target (capsule_ros__rosidl_generator_py) whose include path is
# "prefixed in the source directory"; the /opt/python symlink (step 3) names the same headers.
# --paths: the repo root is the one package (package.xml, build_type ament_cmake); no crawling.
colcon --log-base "$ROOT/log" build \
    --paths "$ROOT" \
    --build-base "$ROOT/build" --install-base "$ROOT/install" \
    --event-handlers desktop_notification- status- \
    --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" \
                 -DPython3_NumPy_INCLUDE_DIR="$OPTPY/lib/python3.11/site-packages/numpy/_core/include" \
                 -DBUILD_TESTING=OFF
echo "[setup] done: source scripts/env.sh to use install/capsule_ros"
