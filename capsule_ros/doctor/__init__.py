"""What the node needs where it runs, checked one by one, each saying why it failed.

    python -m capsule_ros.doctor [--json] [--params FILE] [--device auto|cpu|cuda]

The node calls ``run_checks`` at configure. Every check catches its own failure: a missing
torch, ROS or GPU is a ``fail``/``skipped`` line, never an exception. Nothing heavy is imported
at module import (torch, rclpy, numpy load inside the checks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

STATUSES = ("ok", "warn", "fail", "skipped")


@dataclass(frozen=True)
class Check:
    name: str
    status: str          # ok | warn | fail | skipped
    detail: str          # why: what was found, and for warn/fail what to do
    facts: dict[str, Any] = field(default_factory=dict)   # versions, paths, figures (for --json)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def guarded(name: str, fn: Callable[[], Check]) -> Check:
    """Run one check; an unexpected exception becomes its ``fail`` (the others still run)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it never crashes
        return Check(name, "fail", f"the check itself raised {type(exc).__name__}: {exc}")


def run_checks(device: str, required_bytes: int | None = None, *,
               model_type: str | None = None, require_kernels: bool = False,
               probes: bool = True) -> list[Check]:
    """Every check for running the node on ``device`` ("cpu", "cuda", "cuda:N" or "auto").

    required_bytes: device memory the model and capsule budgets need (None: reported, not judged).
    model_type: the model family (config.json's model_type) to say which kernels matter.
    require_kernels: a missing fla / mamba_ssm is a fail instead of a warn.
    probes: run the import-order and NumPy probes in a child Python (a few seconds; a NumPy ABI
    mismatch can crash the process that converts a message, so never in-process).
    """
    from capsule_ros.doctor import gpu, kernels, numpy_abi, ros_env

    checks = [guarded("torch", gpu.check_torch)]
    cuda = gpu.wants_cuda(device)
    checks += [
        guarded("gpu", lambda: gpu.check_gpu(device, cuda)),
        guarded("triton", lambda: gpu.check_triton(cuda)),
        guarded("kernels", lambda: kernels.check_kernels(cuda, model_type, require_kernels)),
        guarded("gpu_memory", lambda: gpu.check_memory(cuda, required_bytes)),
        guarded("numpy_abi", lambda: numpy_abi.check_numpy_abi(probes)),
        guarded("ros_after_torch", lambda: ros_env.check_ros_after_torch(probes)),
        guarded("rclpy_distro", ros_env.check_distro),
    ]
    return checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]
