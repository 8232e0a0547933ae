"""torch, the GPU it sees, a Triton kernel, and free device memory."""
from __future__ import annotations

import os
import shutil

from capsule_ros.doctor import Check

MiB = 1 << 20
# Thor's GPU: compute capability 11.0 (sm_110) under CUDA 13; CUDA 12.x called it sm_101.
THOR_CAPABILITY = (11, 0)


def wants_cuda(device: str) -> bool:
    """cpu -> False, cuda[:N] -> True, auto -> whether torch sees a CUDA device."""
    if device.startswith("cuda"):
        return True
    if device == "auto":
        try:
            import torch
            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - no torch: the torch check says so
            return False
    return False


def check_torch() -> Check:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return Check("torch", "fail", f"torch does not import: {exc}. On a Thor install it from "
                     "PyTorch's cu130 index (scripts/thor_setup.sh), never a plain pip install")
    facts = {"version": torch.__version__, "cuda": torch.version.cuda}
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Check("torch", "ok", f"torch {torch.__version__} ({build})", facts)


def _index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _arch_covers(capability: tuple[int, int], arch_list: list[str]) -> tuple[bool, str]:
    """SASS for the same major and a minor <= the device's runs as is; PTX (compute_XY) of an
    older-or-equal architecture is compiled by the driver at load (slower first start)."""
    major, minor = capability
    sass = [a for a in arch_list if a.startswith("sm_")]
    for a in sass:
        num = a[3:].rstrip("af")
        if num.isdigit() and int(num) // 10 == major and int(num) % 10 <= minor:
            return True, f"SASS {a}"
    want = major * 10 + minor
    ptx = [a for a in arch_list if a.startswith("compute_") and a[8:].rstrip("af").isdigit()
           and int(a[8:].rstrip("af")) <= want]
    if ptx:
        return True, f"PTX {ptx[-1]} (JIT-compiled by the driver at first use)"
    return False, f"no sm_{major}{minor} SASS and no compute_XY<= {want} PTX"


def check_gpu(device: str, cuda: bool) -> Check:
    if not cuda:
        return Check("gpu", "skipped", f"device {device!r}: no CUDA device asked for or visible")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return Check("gpu", "fail", f"device {device!r} needs torch: {exc}")
    if not torch.version.cuda:
        return Check("gpu", "fail", f"device {device!r}, but torch {torch.__version__} is a "
                     "CPU-only build: install the cu130 build (docs/THOR.md)")
    if not torch.cuda.is_available():
        return Check("gpu", "fail", f"device {device!r}, but torch (CUDA {torch.version.cuda}) "
                     "sees no GPU: driver, container runtime (--runtime nvidia) or CUDA_VISIBLE_DEVICES")
    idx = _index(device) if device.startswith("cuda") else 0
    name = torch.cuda.get_device_name(idx)
    cap = torch.cuda.get_device_capability(idx)
    archs = torch.cuda.get_arch_list()
    facts = {"name": name, "capability": f"{cap[0]}.{cap[1]}", "arch_list": archs,
             "torch_cuda": torch.version.cuda}
    covered, how = _arch_covers(cap, archs)
    if not covered:
        hint = (" This is the Thor trap: PyPI's cu128 aarch64 wheel has no sm_110 kernels; use "
                "https://download.pytorch.org/whl/cu130 (docs/THOR.md)." if cap == THOR_CAPABILITY else "")
        return Check("gpu", "fail", f"{name} is sm_{cap[0]}{cap[1]}; torch's arch list {archs} "
                     f"has {how}: every op fails with 'no kernel image'.{hint}", facts)
    # The arch list can be right and ops still fail (driver too old for the build): run one.
    try:
        x = torch.arange(1, 1025, device=f"cuda:{idx}", dtype=torch.float32)
        got = float((x @ x).item())
    except Exception as exc:  # noqa: BLE001
        return Check("gpu", "fail", f"{name}: a matmul on the device failed: {exc}", facts)
    expected = 1024 * 1025 * 2049 / 6   # sum of k^2, k = 1..1024
    if abs(got - expected) > 1e-3 * expected:
        return Check("gpu", "fail", f"{name}: a matmul returned {got}, expected {expected}", facts)
    return Check("gpu", "ok", f"{name} (sm_{cap[0]}{cap[1]}) covered by {how}; a matmul ran",
                 facts)


def _ptxas_hint(capability: tuple[int, int]) -> str:
    cuda_ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if capability == THOR_CAPABILITY:
        return (" On sm_110 Triton < 3.7's bundled ptxas does not know sm_110a: export "
                f"TRITON_PTXAS_BLACKWELL_PATH={cuda_ptxas} (Triton 3.6) or TRITON_PTXAS_PATH "
                "(older), or use Triton >= 3.7 (ships a Thor ptxas).")
    return ""


def check_triton(cuda: bool) -> Check:
    if not cuda:
        return Check("triton", "skipped", "no CUDA device: Triton kernels only run on the GPU")
    try:
        import torch
        import triton
    except Exception as exc:  # noqa: BLE001
        return Check("triton", "fail", f"triton does not import ({exc}): fla and mamba_ssm "
                     "kernels cannot run; the cu130 torch wheel pulls in the matching triton")
    from capsule_ros.doctor import triton_probe
    env = {k: v for k, v in os.environ.items() if k.startswith("TRITON_PTXAS")}
    facts = {"version": triton.__version__, "ptxas_env": env}
    cap = torch.cuda.get_device_capability(0)
    try:
        got, expected = triton_probe.run_add()
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()
        return Check("triton", "fail", f"triton {triton.__version__}: compiling/running a kernel "
                     f"failed: {' | '.join(msg[-3:])}.{_ptxas_hint(cap)}", facts)
    if got != expected:
        return Check("triton", "fail", f"triton kernel returned {got}, expected {expected}", facts)
    return Check("triton", "ok", f"triton {triton.__version__}: a kernel compiled and ran "
                 f"(sm_{cap[0]}{cap[1]})", facts)


def check_memory(cuda: bool, required_bytes: int | None) -> Check:
    if not cuda:
        return Check("gpu_memory", "skipped", "no CUDA device: nothing to compare")
    import torch
    free, total = torch.cuda.mem_get_info()
    facts = {"free_bytes": free, "total_bytes": total, "required_bytes": required_bytes}
    # Thor's memory is shared with the CPU: "free" moves with everything else on the robot.
    have = f"{free / MiB:.0f} MiB free of {total / MiB:.0f} MiB"
    if required_bytes is None:
        return Check("gpu_memory", "skipped", f"{have}; no required figure given "
                     "(--params or --required-mb)", facts)
    need = f"{required_bytes / MiB:.0f} MiB required"
    if free < required_bytes:
        return Check("gpu_memory", "fail", f"{have}, {need}: lower model size, "
                     "capsules.device_budget_mb or max_context, or free memory", facts)
    if free < 1.2 * required_bytes:
        return Check("gpu_memory", "warn", f"{have}, {need}: under 20% headroom", facts)
    return Check("gpu_memory", "ok", f"{have}, {need}", facts)
