"""python -m capsule_ros.doctor: CPU checks ok and GPU checks skipped here; the right failure for
a NumPy-1.x-built ROS module under NumPy 2 and for a missing or broken kernel package.

The doctor runs as the CLI in a child process (as a user runs it), against the installed
package; the broken environments are built for real in tmp_path and put on the path the way a
sourced ROS overlay would be (AMENT_PREFIX_PATH + PYTHONPATH)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CHECKS = ("gpu", "triton", "gpu_memory", "kernels")


def doctor(*args: str, env: dict | None = None) -> tuple[int, dict]:
    # -P: the installed capsule_ros, not the checkout (the Makefile's rule for tests).
    proc = subprocess.run([sys.executable, "-P", "-m", "capsule_ros.doctor", "--json", *args],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def with_path(var: str, first: Path) -> dict:
    return {var: os.pathsep.join([str(first), *filter(None, [os.environ.get(var)])])}


def test_ci_machine_cpu_checks_ok_gpu_checks_skipped():
    rc, checks = doctor("--params", str(REPO / "config" / "default.yaml"), "--device", "cpu")
    assert rc == 0, checks
    for name in ("torch", "numpy_abi", "ros_after_torch", "rclpy_distro"):
        assert checks[name]["status"] == "ok", checks[name]
    for name in GPU_CHECKS:
        assert checks[name]["status"] == "skipped", checks[name]
        assert checks[name]["detail"], f"{name} skipped without saying why"
    # The pins are Jazzy's: rclpy 7.1.6 (constraints.txt).
    assert checks["rclpy_distro"]["facts"]["rclpy"] == "7.1.6"
    assert checks["rclpy_distro"]["facts"]["distro"] == "jazzy"


def test_cuda_asked_for_on_a_cpu_build_fails_and_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    rc, checks = doctor("--device", "cuda", "--no-probes")
    assert rc == 1
    assert checks["gpu"]["status"] == "fail"
    assert "CPU-only build" in checks["gpu"]["detail"] or "sees no GPU" in checks["gpu"]["detail"]


# NumPy 1.x's import_array() (numpy/core/include/numpy/__multiarray_api.h, 1.26) at module init:
# import numpy.core._multiarray_umath, take its _ARRAY_API capsule, else fail the import. These
# are the calls a module compiled against NumPy 1.x headers makes (cv_bridge's boost module on
# apt Jazzy is one); NumPy 2's own shim then refuses it.
NUMPY1_MODULE_C = r'''
#include <Python.h>
static int import_array_numpy1(void) {
    PyObject *numpy = PyImport_ImportModule("numpy.core._multiarray_umath");
    if (numpy == NULL) return -1;
    PyObject *c_api = PyObject_GetAttrString(numpy, "_ARRAY_API");
    Py_DECREF(numpy);
    if (c_api == NULL) return -1;
    Py_DECREF(c_api);
    return 0;
}
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_legacy", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__legacy(void) {
    if (import_array_numpy1() < 0) {
        PyErr_Print();
        PyErr_SetString(PyExc_ImportError, "numpy.core.multiarray failed to import");
        return NULL;
    }
    return PyModule_Create(&mod);
}
'''


@pytest.fixture
def numpy1_overlay(tmp_path: Path) -> Path:
    """A colcon-style install prefix holding one ROS package whose compiled module was built the
    NumPy 1.x way."""
    cc = shutil.which("cc") or shutil.which("gcc")
    include = sysconfig.get_paths()["include"]
    if not cc or not Path(include, "Python.h").is_file():
        pytest.skip("needs a C compiler and Python.h to build the NumPy-1.x-style module")
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / "lib" / pyver / "site-packages"
    pkg = site / "np1_probe_msgs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    src = tmp_path / "legacy.c"
    src.write_text(NUMPY1_MODULE_C)
    out = pkg / ("_legacy" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cc, "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(out)],
                   check=True, capture_output=True, timeout=120)
    index = tmp_path / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / "np1_probe_msgs").write_text("")
    return tmp_path


def test_numpy1_built_ros_module_under_numpy2_fails_with_the_reason(numpy1_overlay: Path):
    import numpy
    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("the pinned NumPy is 1.x here: no mismatch to provoke")
    site = next(numpy1_overlay.glob("lib/python3*/site-packages"))
    env = {**with_path("AMENT_PREFIX_PATH", numpy1_overlay), **with_path("PYTHONPATH", site)}
    rc, checks = doctor("--device", "cpu", env=env)
    assert rc == 1
    np_check = checks["numpy_abi"]
    assert np_check["status"] == "fail"
    assert np_check["facts"]["built_numpy1"] == ["np1_probe_msgs._legacy"]
    assert "built against NumPy 1.x" in np_check["detail"]
    assert "import np1_probe_msgs._legacy" in np_check["detail"]
    # NumPy's own refusal, carried through from the probe's child process:
    assert "compiled using NumPy 1.x cannot be run in" in np_check["detail"]
    assert "numpy<2" in np_check["detail"]
    # Only that check fails: the rest of the environment is as good as before.
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["numpy_abi"]


def test_missing_kernel_package_fails_when_kernels_are_required():
    import importlib.util
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("flash-linear-attention is installed here")
    # default.yaml's model is qwen3_5_text: gated-delta-net layers, fla's kernels.
    rc, checks = doctor("--params", str(REPO / "config" / "default.yaml"), "--device", "cpu",
                        "--require-kernels", "--no-probes")
    assert rc == 1
    assert checks["kernels"]["status"] == "fail"
    assert "fla (flash-linear-attention) is not installed" in checks["kernels"]["detail"]
    assert checks["kernels"]["facts"] == {"fla": {"state": "absent", "detail": "not installed"}}


def test_broken_kernel_package_fails_without_being_asked(tmp_path: Path):
    # A mamba_ssm built without its CUDA extension: the released __init__ imports the
    # selective-scan extension module, which is not there (why gpu_wheels.sh strips __init__).
    pkg = tmp_path / "mamba_ssm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "2.3.2"\nimport selective_scan_cuda\n')
    rc, checks = doctor("--device", "cpu", "--no-probes", env=with_path("PYTHONPATH", tmp_path))
    assert rc == 1
    k = checks["kernels"]
    assert k["status"] == "fail"
    assert k["facts"]["mamba_ssm"]["state"] == "broken"
    assert "No module named 'selective_scan_cuda'" in k["detail"]
    assert "breaks model loading" in k["detail"]


def test_run_checks_is_what_the_node_calls():
    from capsule_ros.doctor import STATUSES, Check, failed, run_checks
    checks = run_checks("cpu", None, probes=False)
    assert [c.name for c in checks] == ["torch", "gpu", "triton", "kernels", "gpu_memory",
                                        "numpy_abi", "ros_after_torch", "rclpy_distro"]
    assert all(isinstance(c, Check) and c.status in STATUSES and c.detail for c in checks)
    assert failed(checks) == []
    by = {c.name: c for c in checks}
    assert by["ros_after_torch"].status == "skipped" and "probes off" in by["ros_after_torch"].detail
    assert "probe off" in by["numpy_abi"].detail
    with pytest.raises(ValueError):
        Check("x", "fine", "not a status")


def test_torch_arch_list_coverage_for_thor():
    from capsule_ros.doctor.gpu import _arch_covers
    # torch 2.9.1+cu128's aarch64 arch list, as reported from a Thor (no sm_110, no PTX):
    cu128 = ["sm_80", "sm_90", "sm_100", "sm_120"]
    assert _arch_covers((11, 0), cu128)[0] is False
    assert _arch_covers((11, 0), cu128 + ["sm_110"]) == (True, "SASS sm_110")
    # PTX of an older architecture is JIT-compiled by the driver; a newer one is not usable.
    assert _arch_covers((11, 0), ["sm_90", "compute_90"])[0] is True
    assert _arch_covers((11, 0), ["sm_120", "compute_120"])[0] is False
    # The H200 (sm_90) with the same list:
    assert _arch_covers((9, 0), cu128) == (True, "SASS sm_90")


def test_numpy_build_marker_on_real_binaries(numpy1_overlay: Path):
    from capsule_ros.doctor.numpy_abi import numpy_build_major
    legacy = next(numpy1_overlay.rglob("_legacy*.so"))
    assert numpy_build_major(legacy) == 1
    import torch
    # torch's Python bindings are built against NumPy 2 headers (torch 2.13 wheels).
    lib = Path(torch.__file__).parent / "lib" / "libtorch_python.so"
    if not lib.is_file():
        pytest.skip(f"{lib} not in this torch build")
    assert numpy_build_major(lib) == 2


def test_distro_mismatch_between_environment_and_rclpy_is_a_warning(monkeypatch):
    from capsule_ros.doctor.ros_env import check_distro
    monkeypatch.setenv("ROS_DISTRO", "kilted")
    c = check_distro()
    assert c.status == "warn"
    assert "ROS_DISTRO=kilted but rclpy 7.1.6 is jazzy" in c.detail
