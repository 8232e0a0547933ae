#!/usr/bin/env python3
"""Per-query cost on the real query path with the background work on and off, in one run.

Drives the real ``Pipeline`` (``build_pipeline`` from a params dict, ``pipeline.start`` runs the
real worker thread, ``pipeline.on_message`` hands on) with two streams: ``front`` (a 640x480
rgb8 camera trigger, joint states as context) and ``arm`` (triggered by the joint states). The
loop is closed: each message is handed on when the previous answer is out, so the background
work of one query (a persist, a verify slice, a prefetch) overlaps the next one: the worst case
for the query path.

Configurations, every combination of:

* persistence  ``capsules.persist_on_commit`` off / on;
* verify       ``capsules.verify_every`` 0 / 8;
* file tier    no budgets / ``device_budget_mb`` + ``host_budget_mb`` small and
               ``file_budget_mb`` set, so capsules go to files.

All eight pipelines, and a copy of the first as an A/A control, are built first and driven in turns (``--block`` steps each, round after
round), so a change in the machine's load hits every configuration alike. Between turns a
pipeline's background work is let finish and its worker stopped, so nothing of it runs in
another's turn. Per query it records what the answer reports (encode, and restore + append +
act + commit = ``query_ms``) and the wall time from hand-on to the answer; per configuration the
work done off the path: files written (``Persister.stats``), verifications completed, and
prefetches (the file tier's I/O thread; null without a file tier).

    python bench/query_path.py [--steps 500] [--block 10] [--machine cpu-2c]

Prints a table and writes ``bench/results/query_path_<machine>.json``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from capsule_ops import machine_label, write_results  # noqa: E402

from capsule_ros.config import from_params  # noqa: E402
from capsule_ros.runtime.build import build_pipeline  # noqa: E402
from capsule_ros.runtime.engine import stats as engine_stats  # noqa: E402
from capsule_ros.runtime.outcome import Answer, Failure  # noqa: E402

W, H = 640, 480
JOINTS = [f"joint_{i}" for i in range(1, 8)]
# The device budget holds both streams' current boundaries (front's reaches 12.6 MB with verify's
# full journal just before its rebase at 4096 tokens), not their histories: those go to the host
# tier, too small for most of them, and so to files.
TIER_MB = {"device_budget_mb": 16.0, "host_budget_mb": 4.0, "file_budget_mb": 1024.0}


def params(directory: str, persist: bool, verify: bool, file_tier: bool, max_context: int) -> dict:
    head = {"kind": "continuous", "horizon": 8, "dof": 7, "step_period": 0.1}
    caps: dict[str, Any] = {"history_depth": 8, "context_policy": "rebase", "rebase_window": 8,
                            "directory": directory, "persist_on_commit": persist,
                            "verify_every": 8 if verify else 0}
    if file_tier:
        caps.update(TIER_MB)
    return {"model": {"config_file": str(ROOT / "config/models/default_qwen3_5.json"), "seed": 0,
                      "max_context": max_context, "chunk_size": 64, "threads": 1},
            "capsules": caps,
            "inputs": {"names": ["front_cam", "joints"],
                       "front_cam": {"topic": "/front_cam/image_raw", "type": "sensor_msgs/msg/Image",
                                     "encoder": "image", "resize": [32, 32], "patch": 8,
                                     "expect_size": [H, W]},
                       "joints": {"topic": "/joint_states", "type": "sensor_msgs/msg/JointState",
                                  "encoder": "joint_state", "joints": JOINTS,
                                  "fields": ["position", "velocity"]}},
            "streams": {"names": ["front", "arm"],
                        "front": {"trigger": "front_cam", "context": ["joints"], "head": head},
                        "arm": {"trigger": "joints", "head": head}}}


def _header(k: int) -> NS:
    return NS(stamp=NS(sec=k // 10, nanosec=(k % 10) * 100_000_000), frame_id="")


def image(k: int, pixels: bytes) -> NS:
    return NS(header=_header(k), height=H, width=W, encoding="rgb8", is_bigendian=0, step=W * 3,
              data=pixels)


def joints(k: int) -> NS:
    return NS(header=_header(k), name=list(JOINTS), position=[0.01 * k + i for i in range(7)],
              velocity=[0.1] * 7, effort=[])


class Rig:
    """One configuration: its pipeline, what it answered and how long each answer took."""

    def __init__(self, name: str, flags: dict[str, bool], root: Path, max_context: int) -> None:
        self.name, self.flags = name, flags
        directory = root / name
        self.pipeline = build_pipeline(from_params(params(str(directory), max_context=max_context,
                                                          **flags)), node_name="/bench")
        self.samples: list[dict] = []
        self.failures: list[str] = []
        self._answers: list[Answer] = []
        self._event = threading.Event()

    def _publish(self, outcome: Any) -> None:
        if isinstance(outcome, Answer):
            self._answers.append(outcome)
            self._event.set()
        elif isinstance(outcome, Failure) and outcome.request_id:
            self.failures.append(f"{outcome.code.name}: {outcome.text[:120]}")
            self._event.set()

    def turn(self, steps: range, pixels: bytes, record: bool) -> None:
        self.pipeline.start(self._publish, time.monotonic_ns)
        try:
            for k in steps:
                for input_name, msg, stream in (("joints", joints(k), "arm"),
                                                ("front_cam", image(k, pixels), "front")):
                    self._event.clear()
                    before = len(self._answers) + len(self.failures)
                    t0 = time.perf_counter()
                    self.pipeline.on_message(input_name, msg, time.monotonic_ns())
                    while len(self._answers) + len(self.failures) == before:
                        if not self._event.wait(60):
                            raise TimeoutError(f"{self.name}: no answer to {input_name} #{k}")
                        self._event.clear()
                    wall = (time.perf_counter() - t0) * 1e3
                    if record and len(self._answers) + len(self.failures) > before \
                            and self._answers and self._answers[-1].stream == stream:
                        a = self._answers[-1]
                        extra = {f: getattr(a, f) for f in vars(a)
                                 if f.endswith("_ms") and f not in _ANSWER_MS}
                        self.samples.append({
                            "stream": stream, "encode_ms": a.encode_ms,
                            # a wait for the file tier is the query's too (its own field)
                            "query_ms": (a.fetch_ms + a.restore_ms + a.append_ms + a.act_ms
                                         + a.commit_ms),
                            "restore_ms": a.restore_ms, "commit_ms": a.commit_ms,
                            "wall_ms": wall, **extra})
            self.settle()
        finally:
            self.pipeline.stop()

    def settle(self, timeout: float = 60.0) -> None:
        """Let this pipeline's background work finish inside its own turn."""
        deadline = time.monotonic() + timeout
        persister = self.pipeline.persister
        if persister is not None:
            persister.flush(timeout)
        engine = self.pipeline.engine
        while getattr(engine, "verifications_due", 0) and time.monotonic() < deadline:
            time.sleep(0.01)   # the worker runs the verification slices while nothing is queued
        self.pipeline.scheduler.wait_idle(max(0.1, deadline - time.monotonic()))

    def off_path(self) -> dict:
        engine = self.pipeline.engine
        counters = dict(engine.counters)
        tiers = engine_stats(engine)["tier_counters"]
        persist = self.pipeline.persister.stats() if self.pipeline.persister else None
        files = engine.store.files   # the file tier's I/O thread: writes behind, prefetches
        tier_io = dict(files.counters) if files is not None else None
        prefetches = tier_io["prefetches"] if tier_io else None
        return {"files_written": persist["saved"] if persist else 0,
                "tier_io": tier_io,
                "persist": {k: v for k, v in persist.items() if k != "errors"} if persist else None,
                "verifications": counters.get("verifies") if self.flags["verify"] else 0,
                "verify_slices": counters.get("verify_slices"),
                "prefetches": prefetches,
                "engine_counters": counters, "tier_counters": tiers}

    def close(self) -> None:
        self.pipeline.close()


_ANSWER_MS = {"encode_ms", "restore_ms", "append_ms", "act_ms", "commit_ms"}


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def summary(rig: Rig) -> dict:
    out: dict[str, Any] = {"config": rig.name, **rig.flags, "failures": len(rig.failures),
                           "failure_examples": sorted(set(rig.failures))[:3]}
    for stream in ("front", "arm"):
        rows = [s for s in rig.samples if s["stream"] == stream]
        per = {}
        for field in sorted({k for s in rows for k in s} - {"stream"}):
            xs = [s[field] for s in rows if s.get(field) is not None]
            per[field] = {"p50": pct(xs, 50), "p99": pct(xs, 99), "max": pct(xs, 100)}
        per["n"] = len(rows)
        out[stream] = per
    out["off_path"] = rig.off_path()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="recorded steps per configuration "
                    "(a step: one joint-state query and one image query)")
    ap.add_argument("--block", type=int, default=10, help="steps per turn")
    ap.add_argument("--warmup", type=int, default=3, help="unrecorded steps per configuration")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--machine", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = args.machine or machine_label(torch.device("cpu"))
    pixels = np.random.default_rng(0).integers(0, 256, W * H * 3, dtype=np.uint8).tobytes()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="query_path_") as tmp:
        rigs = []
        for persist, verify, file_tier in itertools.product((False, True), repeat=3):
            flags = {"persist": persist, "verify": verify, "file_tier": file_tier}
            name = "-".join(f"{k}_{'on' if v else 'off'}" for k, v in flags.items())
            rigs.append(Rig(name, flags, Path(tmp), args.max_context))
        # an A/A control: the baseline again, so the table shows what noise alone does here
        rigs.append(Rig("control-" + rigs[0].name, dict(rigs[0].flags), Path(tmp), args.max_context))
        print(f"machine {machine}, torch {torch.__version__}, 1 torch thread; "
              f"{len(rigs)} configurations, {args.steps} steps each in turns of {args.block}; "
              f"load average before {load_before[0]:.2f}", flush=True)
        t0 = time.monotonic()
        for rig in rigs:
            rig.turn(range(-args.warmup, 0), pixels, record=False)
        k = 0
        while k < args.steps:
            steps = range(k, min(k + args.block, args.steps))
            for rig in rigs:
                rig.turn(steps, pixels, record=True)
            k = steps.stop
            print(f"  {k}/{args.steps} steps, {time.monotonic() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        results = [summary(rig) for rig in rigs]
        positions = {rig.name: {s: rig.pipeline.engine.store.position(s) for s in ("front", "arm")}
                     for rig in rigs}
        for rig in rigs:
            rig.close()
    load_after = os.getloadavg()
    by = {(r["persist"], r["verify"], r["file_tier"]): r for r in results
          if not r["config"].startswith("control-")}
    ratios = {}
    for verify, file_tier in itertools.product((False, True), repeat=2):
        off, on = by[(False, verify, file_tier)], by[(True, verify, file_tier)]
        key = f"verify_{'on' if verify else 'off'}-file_tier_{'on' if file_tier else 'off'}"
        ratios[key] = {s: {q: round(on[s]["query_ms"][q] / off[s]["query_ms"][q], 3)
                           for q in ("p50", "p99")} for s in ("front", "arm")}
    print(f"\nquery_path on `{machine}` (ms; query = restore + append + act + commit as the answer "
          f"reports it; wall = hand-on to answer; load average {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f})\n")
    print("| persist | verify | file tier | stream | n | encode p50 | query p50 | query p99 | "
          "wall p50 | wall p99 | files written | verifications | prefetches |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    for r in results:
        op = r["off_path"]
        for s in ("front", "arm"):
            q, w, e = r[s]["query_ms"], r[s]["wall_ms"], r[s]["encode_ms"]
            first = "off (A/A control)" if r["config"].startswith("control-") else onoff(r["persist"])
            print(f"| {first} | {onoff(r['verify'])} | {onoff(r['file_tier'])} | {s} | "
                  f"{r[s]['n']} | {e['p50']:.2f} | {q['p50']:.2f} | {q['p99']:.2f} | {w['p50']:.2f} | "
                  f"{w['p99']:.2f} | {op['files_written']} | {_cell(op['verifications'])} | "
                  f"{_cell(op['prefetches'])} |")
    control, base = results[-1], results[0]
    ratios["control_over_baseline"] = {s: {q: round(control[s]["query_ms"][q] / base[s]["query_ms"][q], 3)
                                           for q in ("p50", "p99")} for s in ("front", "arm")}
    for r in results:
        if r["failures"]:
            print(f"  {r['config']}: {r['failures']} failed queries, e.g. {r['failure_examples'][0]}")
    print("\npersistence on / off, query_ms (target p99 <= 1.2x; control_over_baseline: two "
          "identical configurations, i.e. the noise):")
    for key, v in ratios.items():
        print(f"  {key}: " + ", ".join(f"{s} p50 {v[s]['p50']:.2f}x p99 {v[s]['p99']:.2f}x" for s in v))
    doc = {"machine": machine, "torch": torch.__version__, "torch_threads": 1,
           "steps": args.steps, "block": args.block, "warmup": args.warmup,
           "max_context": args.max_context, "image": [H, W], "tier_budgets_mb": TIER_MB,
           "verify_every": 8, "load_average_before": load_before, "load_average_after": load_after,
           "final_positions": positions, "persist_on_over_off": ratios, "configs": results}
    write_results(doc, args.out or ROOT / "bench" / "results" / f"query_path_{machine}.json")


def _cell(v: Any) -> str:
    return "null" if v is None else str(v)


if __name__ == "__main__":
    main()
