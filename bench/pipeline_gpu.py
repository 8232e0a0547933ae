"""End to end through the node's ``Pipeline`` on a GPU: the demo bag's messages (issue 10).

    python bench/pipeline_gpu.py [--passes 5] [--cuda-step lean-cuda+step] [--dtype bfloat16]

Builds the pipeline from ``config/default.yaml`` as the node does (``build_pipeline``), with
``model.device: cuda``: the model, the image and joint encoders and the action heads all on the
device. ``warm_up`` captures (and compiles) everything first, as the node's configure does. Then
the bundled bag runs through ``run_offline`` (the pipeline code the node runs, minus ROS)
``--passes`` times, both streams reset between passes. Per answered query, the times the answer
itself reports: encode, restore, append, act (the head), commit. Prints p50/p99 and writes
``bench/results/pipeline_gpu_<card>.json``; the capture counter must not move while serving.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from capsule_ros.config import load_yaml  # noqa: E402
from capsule_ros.offline import run_offline  # noqa: E402
from capsule_ros.runtime.build import build_pipeline  # noqa: E402
from capsule_ros.runtime.figures import percentile  # noqa: E402
from capsule_ros.runtime.outcome import Answer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ttft import commit_id  # noqa: E402

BAG = ROOT / "test" / "data" / "demo_bag"
PARTS = ("encode_ms", "restore_ms", "append_ms", "act_ms", "commit_ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--cuda-step", default="lean-cuda+step")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal of this script, no figure")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.passes < 2:
        ap.error("--passes must be at least 2: the first pass is not timed")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/pipeline_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0).replace(" ", "-") if args.device.startswith("cuda") else "cpu"
    config = load_yaml(ROOT / "config" / "default.yaml")
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, device=args.device, dtype=args.dtype, cuda_step=args.cuda_step))
    t0 = time.perf_counter()
    pipeline = build_pipeline(config)
    model = pipeline.engine.model
    info = model.warm_up(max_tokens=pipeline.engine.chunk_size)
    configure_s = time.perf_counter() - t0
    captures = model.captures
    answers: list[Answer] = []
    per_pass = []
    for i in range(args.passes):
        if i:
            for stream in config.streams:
                pipeline.reset(stream)
        got = [o for o in run_offline(config, BAG, pipeline) if isinstance(o, Answer)]
        per_pass.append(len(got))
        if i:  # the first pass pays the first-use costs a warm-up does not (allocator growth)
            answers += got
    row = {"card": card, "commit": commit_id(), "execution": model.execution, "dtype": args.dtype,
           "configure_s": round(configure_s, 1), "graphs": info["captures"],
           "captures_while_serving": model.captures - captures,
           "answers_per_pass": per_pass, "queries_timed": len(answers)}
    for part in PARTS:
        xs = [getattr(a, part) for a in answers]
        row[part.replace("_ms", "_p50_ms")] = round(statistics.median(xs), 3)
        row[part.replace("_ms", "_p99_ms")] = round(percentile(xs, 99), 3)
    totals = [sum(getattr(a, p) for p in PARTS) for a in answers]
    row["query_p50_ms"] = round(statistics.median(totals), 3)
    row["query_p99_ms"] = round(percentile(totals, 99), 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_gpu_{card}.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
