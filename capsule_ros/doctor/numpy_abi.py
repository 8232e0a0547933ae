"""Is the NumPy in this interpreter the one the ROS packages' compiled modules were built for?

Evidence, strongest first:
1. Compiled modules inside ROS packages (every prefix on AMENT_PREFIX_PATH and the one holding
   sensor_msgs) that use NumPy's C API name the module their import_array() loads: headers of
   NumPy >= 2 name ``numpy._core._multiarray_umath``; NumPy 1.x headers only
   ``numpy.core._multiarray_umath``. NumPy 2 refuses such 1.x modules at import.
2. An apt install (/opt/ros/<distro>) is built against the distro's python3-numpy (Ubuntu 24.04:
   1.26); its version is read from the system dist-packages. Generated message code reads
   NumPy's structs directly (no import_array), so it carries no marker of its own.
3. A probe in a child Python: import NumPy, the 1.x-built modules found, and round-trip a
   message with a NumPy array field (sensor_msgs/CameraInfo.k) through the C typesupport.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from capsule_ros.doctor import Check
from capsule_ros.doctor.ros_env import install_prefix, module_dir

NP2_MARK = b"numpy._core._multiarray_umath"
NP1_MARK = b"numpy.core._multiarray_umath"
MAX_SCAN_BYTES = 64 << 20
# Where Debian/Ubuntu keep python3-numpy (what apt's ROS packages were built against).
SYSTEM_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")


def numpy_build_major(so_path: Path) -> int | None:
    """2 or 1 for a module that uses NumPy's C API, None when it names neither."""
    try:
        if so_path.stat().st_size > MAX_SCAN_BYTES:
            return None
        data = so_path.read_bytes()
    except OSError:
        return None
    if NP2_MARK in data:
        return 2
    if NP1_MARK in data:
        return 1
    return None


def ros_prefixes() -> list[Path]:
    out: list[Path] = []
    for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if p and Path(p).is_dir() and Path(p).resolve() not in out:
            out.append(Path(p).resolve())
    msgs = module_dir("sensor_msgs")
    prefix = install_prefix(msgs) if msgs else None
    if prefix and prefix.resolve() not in out:
        out.append(prefix.resolve())
    return out


def ros_package_modules(prefix: Path) -> list[tuple[str, Path]]:
    """(dotted module name, .so path) of compiled modules in the prefix's ROS packages only
    (names from the ament index: a venv prefix also holds torch, which is not ROS's)."""
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    if not index.is_dir():
        return []
    names = {p.name for p in index.iterdir()}
    found = []
    for site in list(prefix.glob("lib/python3*/site-packages")) + list(
            prefix.glob("lib/python3*/dist-packages")):
        for name in sorted(names):
            pkg = site / name
            if not pkg.is_dir():
                continue
            for so in sorted(pkg.rglob("*.so")):
                rel = so.relative_to(site).with_suffix("")
                dotted = ".".join(rel.parts).split(".cpython-")[0]
                found.append((dotted, so))
    return found


def system_numpy_version(dist_packages: Path = SYSTEM_DIST_PACKAGES) -> str | None:
    ver = dist_packages / "numpy" / "version.py"
    if not ver.is_file():
        return None
    m = re.search(r"^(?:__)?version(?:__)?\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]",
                  ver.read_text(), re.M)
    return m.group(1) if m else None


def _major(version: str) -> int:
    return int(version.split(".")[0])


def probe_steps(np1_modules: list[str]) -> list[tuple[str, str]]:
    steps = [("import numpy", "import numpy")]
    steps += [(f"import {m}", f"import importlib; importlib.import_module({m!r})")
              for m in np1_modules[:5]]
    steps.append(("CameraInfo round trip", (
        "import numpy\n"
        "from rclpy.serialization import serialize_message, deserialize_message\n"
        "from sensor_msgs.msg import CameraInfo\n"
        "m = CameraInfo(k=numpy.arange(9, dtype=numpy.float64))\n"
        "back = deserialize_message(serialize_message(m), CameraInfo)\n"
        "assert list(back.k) == list(range(9)), list(back.k)\n")))
    return steps


def check_numpy_abi(probes: bool) -> Check:
    try:
        import numpy
    except Exception as exc:  # noqa: BLE001
        return Check("numpy_abi", "fail", f"numpy does not import: {exc}")
    runtime = numpy.__version__
    prefixes = ros_prefixes()
    if not prefixes or importlib.util.find_spec("sensor_msgs") is None:
        return Check("numpy_abi", "skipped", f"numpy {runtime}; no ROS install found "
                     "(sensor_msgs not importable, AMENT_PREFIX_PATH empty)")
    built: dict[int, list[str]] = {1: [], 2: []}
    scanned = 0
    for prefix in prefixes:
        for dotted, so in ros_package_modules(prefix):
            scanned += 1
            major = numpy_build_major(so)
            if major:
                built[major].append(dotted)
    apt = [p for p in prefixes if str(p).startswith("/opt/ros/")]
    system = system_numpy_version() if apt else None
    facts = {"numpy": runtime, "prefixes": [str(p) for p in prefixes], "scanned_modules": scanned,
             "built_numpy1": built[1], "built_numpy2": built[2], "system_numpy": system}

    problems = []
    if _major(runtime) >= 2 and built[1]:
        problems.append(f"{len(built[1])} compiled ROS module(s) were built against NumPy 1.x "
                        f"(e.g. {built[1][0]})")
    if _major(runtime) >= 2 and system and _major(system) < 2:
        problems.append(f"the apt ROS install at {apt[0]} was built against the system's "
                        f"NumPy {system}")
    probe_note = "probe off"
    if probes:
        from capsule_ros.doctor.probe import run_steps
        res = run_steps(probe_steps(built[1]))
        facts["probe"] = {"ok": res.ok, "step": res.failed_step, "error": res.error,
                          "output": res.output[-2000:]}
        if res.ok:
            probe_note = "a CameraInfo with a NumPy field round-tripped through the C typesupport"
        else:
            said = next((ln.strip() for ln in res.output.splitlines()
                         if "compiled using NumPy" in ln), "")
            problems.append(f"probe step '{res.failed_step}' failed: {res.error}"
                            + (f" ({said})" if said else ""))
    if problems:
        fix = (" Fix: pip install 'numpy<2' in the venv (scripts/thor_setup.sh pins it)"
               if _major(runtime) >= 2 else "")
        return Check("numpy_abi", "fail", f"NumPy {runtime} is loaded, but "
                     + "; ".join(problems) + "." + fix, facts)
    origin = (f"apt ROS built against NumPy {system}" if system else
              f"{scanned} compiled module(s) in ROS packages, none built for NumPy 1.x")
    return Check("numpy_abi", "ok", f"numpy {runtime}; {origin}; {probe_note}", facts)
