"""python -m capsule_ros.doctor [--json] [--params FILE] [--device auto|cpu|cuda[:N]]
[--required-mb N] [--require-kernels] [--no-probes]

Exit status 1 when any check fails, else 0 (warnings and skipped checks do not fail).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

from capsule_ros.doctor import Check, failed, run_checks


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m capsule_ros.doctor",
                                 description="Check what capsule_node needs where it runs.")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--params", help="the node's parameter file: device, model family, budgets")
    ap.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the params' "
                    "model.device, else auto)")
    ap.add_argument("--required-mb", type=float, help="device memory the deployment needs")
    ap.add_argument("--require-kernels", action="store_true",
                    help="a missing fla / mamba_ssm is a failure, not a warning")
    ap.add_argument("--no-probes", action="store_true",
                    help="skip the child-process import probes")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device, model_type, required, how = "auto", None, None, ""
    if args.params:
        from capsule_ros.doctor.params import from_params_file
        target = from_params_file(args.params)
        device, model_type, required, how = (target.device, target.model_type,
                                             target.required_bytes, target.how)
    if args.device:
        device = args.device
    if args.required_mb is not None:
        required, how = int(args.required_mb * (1 << 20)), "--required-mb"
    checks = run_checks(device, required, model_type=model_type,
                        require_kernels=args.require_kernels, probes=not args.no_probes)
    bad = failed(checks)
    if args.json:
        print(json.dumps({"ok": not bad, "device": device, "model_type": model_type,
                          "required_bytes": required, "required_how": how,
                          "python": sys.version.split()[0], "machine": platform.machine(),
                          "checks": [c.as_dict() for c in checks]}, indent=1))
    else:
        print(f"capsule_ros doctor: device={device} model_type={model_type or '-'} "
              f"python {sys.version.split()[0]} {platform.machine()}")
        for c in checks:
            print(_line(c))
        print("FAIL: " + ", ".join(c.name for c in bad) if bad else "all required checks pass")
    return 1 if bad else 0


def _line(c: Check) -> str:
    return f"  {c.status:<8} {c.name:<16} {c.detail}"


if __name__ == "__main__":
    sys.exit(main())
