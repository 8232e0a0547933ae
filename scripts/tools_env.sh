# Source me after scripts/env.sh (tests only): puts the ros2 tools overlay that
# scripts/tools_overlay.sh built in .tools/ on PATH / PYTHONPATH / AMENT_PREFIX_PATH, and the
# archive's pure-Python diagnostic_updater on PYTHONPATH (CAPSULE_DIAGNOSTICS_PATH names it, so
# a test can take it off again). The overlay's install/local_setup.* cannot do this here: the
# venv prefix has no setup files (see ../shared/ROS_SETUP.md). A no-op when nothing is built.
#   . scripts/env.sh && . scripts/tools_env.sh && ros2 --help
if [ -n "${BASH_SOURCE:-}" ]; then
    _tools_env_file="${BASH_SOURCE[0]}"
elif [ -n "${ZSH_VERSION:-}" ]; then
    eval '_tools_env_file="${(%):-%x}"'
else
    _tools_env_file="${PWD}/scripts/tools_env.sh"
fi
_tools_root="$(cd "$(dirname "$_tools_env_file")/.." && pwd)/.tools"
unset _tools_env_file

# prepend VAR DIR (DIR first, an earlier copy removed); append VAR DIR (DIR last, likewise).
_tools_strip() {
    eval "_cur=\":\${$1:-}:\""
    while case "$_cur" in *":$2:"*) true;; *) false;; esac; do
        _cur="${_cur%%:"$2":*}:${_cur#*:"$2":}"
    done
    _cur="${_cur#:}"; _cur="${_cur%:}"
}
_tools_prepend() { _tools_strip "$1" "$2"; if [ -n "$_cur" ]; then eval "export $1=\"\$2:\$_cur\""; else eval "export $1=\"\$2\""; fi; unset _cur; }
_tools_append()  { _tools_strip "$1" "$2"; if [ -n "$_cur" ]; then eval "export $1=\"\$_cur:\$2\""; else eval "export $1=\"\$2\""; fi; unset _cur; }

if [ -x "$_tools_root/install/ros2cli/bin/ros2" ]; then
    for _p in "$_tools_root"/install/*/; do
        _p="${_p%/}"
        [ -d "$_p/lib/python3.11/site-packages" ] && _tools_prepend PYTHONPATH "$_p/lib/python3.11/site-packages"
        [ -d "$_p/bin" ] && _tools_prepend PATH "$_p/bin"
        [ -d "$_p/lib" ] && _tools_prepend LD_LIBRARY_PATH "$_p/lib"
        _tools_prepend AMENT_PREFIX_PATH "$_p"
    done
    unset _p
    # this checkout's package in front of the tools, the venv (base prefix) last
    if [ -d "${CAPSULE_ROS_ROOT:-}/install/capsule_ros" ]; then
        _tools_prepend AMENT_PREFIX_PATH "$CAPSULE_ROS_ROOT/install/capsule_ros"
    fi
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        _tools_append AMENT_PREFIX_PATH "$VIRTUAL_ENV"
    fi
    export CAPSULE_ROS_TOOLS="$_tools_root"
    _diag="$_tools_root/src/ros2_jazzy_tools/diagnostics"
    if [ -d "$_diag/diagnostic_updater" ]; then
        _tools_append PYTHONPATH "$_diag"
        export CAPSULE_DIAGNOSTICS_PATH="$_diag"
    fi
    unset _diag
fi
unset _tools_root
unset -f _tools_strip _tools_prepend _tools_append 2>/dev/null || true
