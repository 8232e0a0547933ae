"""``make demo``: the node on the default model, driven by the bundled bag.

Starts ``capsule_node`` as its own process (with the launch file's arguments and sim time),
replays ``test/data/demo_bag`` into it with ``capsule_replay``'s library API, records the answers,
prints each stream's actions and per-query latencies, and writes ``demo_summary.json``.
Exit status 0 only when every trigger was answered with an action.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.serialization import deserialize_message

from .config import NODE_NAME, load_yaml, package_root
from .ros.launch_args import node_arguments
from .ros.replay import Replayer

PARTS = ("encode_ms", "restore_ms", "append_ms", "act_ms", "commit_ms")


def machine_label(device: str = "cpu") -> str:
    """A stable label for where numbers came from: ``cpu-<cores>c`` or the GPU's name."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{os.cpu_count()}c"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


def summarize(chunks: list, statuses: list, streams: list[str], machine: str) -> dict:
    """Per stream: queries, errors, p50/p99 of each latency part."""
    out: dict = {"machine": machine, "streams": {}}
    for name in streams:
        mine = sorted((c for c in chunks if c.stream == name), key=lambda c: c.request_id)
        parts = {p: [getattr(c, p) for c in mine] for p in PARTS}
        out["streams"][name] = {
            "queries": len(mine),
            "errors": sum(1 for s in statuses if s.stream == name and s.code >= 100),
            "final_boundary": mine[-1].boundary if mine else 0,
            **{p: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
               for p, v in parts.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-file", default=str(package_root() / "config" / "default.yaml"))
    ap.add_argument("--bag", default=str(Path.cwd() / "test" / "data" / "demo_bag"))
    ap.add_argument("--mode", choices=("lockstep", "timed"), default="lockstep")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--summary", default="demo_summary.json")
    args = ap.parse_args(argv)

    from capsule_ros.msg import ActionChunk, Status

    config = load_yaml(args.params_file)
    node_args = node_arguments(params_file=args.params_file, use_sim_time=True)
    print(f"[demo] starting {NODE_NAME} ({config.model.config_file or config.model.path})", flush=True)
    node_proc = subprocess.Popen([sys.executable, "-P", "-m", "capsule_ros.ros.main",
                                  *node_args.cli_args()])
    rclpy.init()
    node = rclpy.create_node("capsule_demo")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    ns = f"/{NODE_NAME}"
    triggers = sorted({config.inputs[s.trigger].topic for s in config.streams.values()})
    try:
        result = Replayer(node, executor, args.bag, mode=args.mode, rate=args.rate,
                          triggers=triggers, answers=[f"{ns}/actions", f"{ns}/status"],
                          answer_types=["capsule_ros/msg/ActionChunk", "capsule_ros/msg/Status"],
                          topics=[spec.topic for spec in config.inputs.values()],
                          record=str(Path(args.out) / "answers"), overwrite=True,
                          # the node's accounting: the replay's end waits for what it counted,
                          # and a first trigger lost while DDS matched is told from a slow one
                          node_name=ns, wait_timeout=120.0, answer_timeout=60.0, drain=0.5).run()
    finally:
        node_proc.terminate()
        try:
            node_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        node.destroy_node()
        rclpy.try_shutdown()

    chunks = [deserialize_message(a.rawdata, ActionChunk) for a in result.answers_on(f"{ns}/actions")]
    statuses = [deserialize_message(a.rawdata, Status) for a in result.answers_on(f"{ns}/status")]
    for name in config.streams:
        print(f"\n== stream {name} ==")
        print(f"{'id':>3} {'boundary':>8} {'encode':>7} {'restore':>8} {'append':>8} {'act':>7} "
              f"{'commit':>7}  actions[0,:4]")
        for c in sorted((c for c in chunks if c.stream == name), key=lambda c: c.request_id):
            first = " ".join(f"{v:+.3f}" for v in list(c.values)[:4])
            print(f"{c.request_id:>3} {c.boundary:>8} {c.encode_ms:>7.2f} {c.restore_ms:>8.2f} "
                  f"{c.append_ms:>8.2f} {c.act_ms:>7.2f} {c.commit_ms:>7.2f}  {first}")
    print("(ms on this machine; each answer is published after its own commit)")
    for s in statuses:
        print(f"status [{s.stream}#{s.request_id}] code {s.code}: {s.text}")

    summary = summarize(chunks, statuses, list(config.streams), machine_label(config.model.device))
    summary.update({"platform": platform.platform(), "model": config.model.config_file or config.model.path,
                    "mode": args.mode, "triggers": result.triggers, "answers": len(result.answers),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    for warning in result.warnings:
        print(f"[demo] replay: {warning}")
    print(f"\n[demo] {len(chunks)} actions for {result.triggers} triggers; summary in {args.summary}")
    for name, s in summary["streams"].items():
        print(f"[demo] {name}: {s['queries']} queries, {s['errors']} errors, p50 restore "
              f"{s['restore_ms']['p50']} / append {s['append_ms']['p50']} / act {s['act_ms']['p50']}"
              f" / encode {s['encode_ms']['p50']}"
              f" / commit {s['commit_ms']['p50']} ms ({summary['machine']})")
    return 0 if len(chunks) == result.triggers and result.triggers > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
