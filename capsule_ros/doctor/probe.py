"""Run steps of Python in a child interpreter and say which step failed and how.

Import order and NumPy ABI faults are process-wide (the first library loaded wins, a struct
layout mismatch can segfault), so they are probed in a child that may die without taking the
caller with it. Each step prints a marker before and after, so a crash names its step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

_RUNNER = r'''
import json, sys, traceback
steps = json.loads(sys.argv[1])
for label, code in steps:
    print("@@START " + label, flush=True)
    try:
        exec(compile(code, label, "exec"), {})
    except BaseException as exc:
        err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print("@@ERR " + json.dumps([label, err]), flush=True)
        sys.exit(3)
    print("@@OK " + label, flush=True)
'''


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    failed_step: str | None   # the label of the step that raised or crashed
    error: str                # the exception line, or how the process died
    output: str               # everything else the child printed (NumPy writes its advice here)


def run_steps(steps: list[tuple[str, str]], timeout: float = 180.0) -> ProbeResult:
    env = dict(os.environ)
    # The child sees exactly the caller's import path (venv, install tree, overlays).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(steps)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        return ProbeResult(False, None, f"timed out after {timeout:.0f} s", "")
    started, error, rest = None, "", []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if line.startswith("@@START "):
            started = line[8:]
        elif line.startswith("@@OK "):
            started = None
        elif line.startswith("@@ERR "):
            started, error = json.loads(line[6:])
        elif line.strip():
            rest.append(line)
    if proc.returncode == 0:
        return ProbeResult(True, None, "", "\n".join(rest))
    if not error:
        error = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                 else f"exited with status {proc.returncode}")
    return ProbeResult(False, started, error, "\n".join(rest))
