# Source me (bash or zsh): activates the venv and puts this repo's colcon install tree first.
#   . scripts/env.sh
# The repo root is derived from this file's location (CAPSULE_ROS_ROOT overrides it).
if [ -n "${BASH_SOURCE:-}" ]; then
    _capsule_env_file="${BASH_SOURCE[0]}"
elif [ -n "${ZSH_VERSION:-}" ]; then
    eval '_capsule_env_file="${(%):-%x}"'
else
    _capsule_env_file="${PWD}/scripts/env.sh"   # POSIX sh cannot know; run it from the repo root
fi
CAPSULE_ROS_ROOT="${CAPSULE_ROS_ROOT:-$(cd "$(dirname "$_capsule_env_file")/.." && pwd)}"
export CAPSULE_ROS_ROOT
unset _capsule_env_file

# prepend VAR DIR: put DIR first in a colon-separated VAR, removing an earlier copy of it.
_capsule_prepend() {
    eval "_cur=\${$1:-}"
    _cur=":${_cur}:"
    while case "$_cur" in *":$2:"*) true;; *) false;; esac; do
        _cur="${_cur%%:"$2":*}:${_cur#*:"$2":}"
    done
    _cur="${_cur#:}"; _cur="${_cur%:}"
    if [ -n "$_cur" ]; then eval "export $1=\"\$2:\$_cur\""; else eval "export $1=\"\$2\""; fi
    unset _cur
}

if [ -f "$CAPSULE_ROS_ROOT/.venv/bin/activate" ]; then
    # activate only when not already in this venv (keeps repeated sourcing cheap and idempotent)
    if [ "${VIRTUAL_ENV:-}" != "$CAPSULE_ROS_ROOT/.venv" ]; then
        . "$CAPSULE_ROS_ROOT/.venv/bin/activate"
    fi
    _capsule_prepend CMAKE_PREFIX_PATH "$CAPSULE_ROS_ROOT/.venv"
    _capsule_prepend AMENT_PREFIX_PATH "$CAPSULE_ROS_ROOT/.venv"
    _capsule_prepend LD_LIBRARY_PATH "$CAPSULE_ROS_ROOT/.venv/lib"
fi

_capsule_pkg="$CAPSULE_ROS_ROOT/install/capsule_ros"
_capsule_pyver=""
for _d in "$_capsule_pkg"/lib/python3.*; do
    [ -d "$_d" ] && _capsule_pyver="${_d##*/}" && break
done
unset _d
_capsule_prepend PYTHONPATH "$_capsule_pkg/lib/${_capsule_pyver:-python3.11}/site-packages"
_capsule_prepend LD_LIBRARY_PATH "$_capsule_pkg/lib"
_capsule_prepend AMENT_PREFIX_PATH "$_capsule_pkg"
_capsule_prepend CMAKE_PREFIX_PATH "$_capsule_pkg"
_capsule_prepend PATH "$_capsule_pkg/lib/capsule_ros"
unset _capsule_pkg _capsule_pyver
unset -f _capsule_prepend 2>/dev/null || true

export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
