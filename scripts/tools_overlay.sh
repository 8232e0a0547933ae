#!/usr/bin/env bash
# Build the real ROS 2 Jazzy CLI/launch tools (launch, launch_ros/ros2launch, ros2cli, ...) from
# ../shared/third_party/ros2_jazzy_tools.tar.gz into .tools/ inside this checkout, for tests.
# Cached: rebuilt only when the archive, the venv's python or the venv's pinned set change.
# Nothing in the node needs this overlay at run time (robots get the tools from apt).
#
#   bash scripts/tools_overlay.sh          build if needed; then `. scripts/tools_env.sh`
#   CAPSULE_TOOLS_ARCHIVE=PATH             another archive
#
# Exit status: 0 built or up to date; 0 with a "skipped" line when the archive is not beside
# the checkout (a clone on its own); 1 when it is missing and CI=true (CI must run these tests).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
ARCHIVE="${CAPSULE_TOOLS_ARCHIVE:-$ROOT/../shared/third_party/ros2_jazzy_tools.tar.gz}"
TOOLS="$ROOT/.tools"
STAMP="$TOOLS/.stamp"
OPTPY=/opt/python/cp311-cp311

if [ ! -f "$ARCHIVE" ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "[tools] FAILED: $ARCHIVE is missing and CI=true; the ros2 CLI tests must run in CI" >&2
        exit 1
    fi
    echo "[tools] skipped: no $ARCHIVE (the ros2 CLI tests will skip)"
    exit 0
fi
ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[tools] FAILED: no venv at $VENV; run scripts/setup.sh first" >&2
    exit 1
fi

# The console scripts embed the venv python's path, and composition_interfaces is compiled
# against the venv's rosidl wheels: both belong in the cache key with the archive.
want="$(sha256sum "$ARCHIVE" | cut -d' ' -f1) $(readlink -f "$VENV/bin/python") $(cat "$VENV/.capsule_ros_stamp" 2>/dev/null || echo nostamp)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$TOOLS/install/ros2cli/bin/ros2" ]; then
    echo "[tools] up to date ($TOOLS)"
    exit 0
fi

# composition_interfaces (a message package) needs the same /opt/python links as ours.
if [ ! -e "$OPTPY/include/python3.11/" ] || [ ! -e "$OPTPY/lib/python3.11/site-packages/numpy/_core/include/" ]; then
    echo "[tools] FAILED: $OPTPY include links missing; run scripts/setup.sh first" >&2
    exit 1
fi

echo "[tools] building $ARCHIVE into $TOOLS (about a minute on 2 cores) ..."
rm -rf "$TOOLS"
mkdir -p "$TOOLS/src"
: > "$TOOLS/COLCON_IGNORE"   # a `colcon build` crawling the repo root must not pick these up
tar xzf "$ARCHIVE" -C "$TOOLS/src"

# Build against the venv only, like scripts/setup.sh (no sourced install tree leaking in).
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
unset PYTHONHOME PYTHONPATH COLCON_PREFIX_PATH
log="$TOOLS/build.log"
if ! colcon --log-base "$TOOLS/log" build \
        --base-paths "$TOOLS/src/ros2_jazzy_tools" \
        --build-base "$TOOLS/build" --install-base "$TOOLS/install" \
        --event-handlers desktop_notification- status- console_cohesion+ \
        --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" \
                     -DPython3_NumPy_INCLUDE_DIR="$OPTPY/lib/python3.11/site-packages/numpy/_core/include" \
                     -DBUILD_TESTING=OFF >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "[tools] FAILED: colcon build of the tools overlay (full log: $log)" >&2
    exit 1
fi
echo "$want" > "$STAMP"
echo "[tools] built $(find "$TOOLS/install" -mindepth 1 -maxdepth 1 -type d | wc -l) packages; use them with: . scripts/tools_env.sh"
