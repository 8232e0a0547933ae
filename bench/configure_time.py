"""Configure time on a GPU: build the default pipeline on CUDA and warm it up (every graph
captured and run once), first with empty compile caches, then again with the caches the first
run left (what a restarted node pays).

    python bench/configure_time.py [--params config/default.yaml] [--dtype bfloat16]

Each measurement runs in a fresh Python process (imports included, as a node start) with
TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR pointed at one temporary directory. Writes
bench/results/configure_time_<card>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from capsule_ros.config import load_yaml, flatten, from_params, yaml_params
from capsule_ros.runtime.build import build_pipeline
params = flatten(yaml_params(sys.argv[1]))
params.update({"model.device": "cuda", "model.dtype": sys.argv[2]})
t_import = time.perf_counter()
pipeline = build_pipeline(from_params(params))
torch.cuda.synchronize()
t_build = time.perf_counter()
info = pipeline.engine.model.warm_up(pipeline.engine.chunk_size)
torch.cuda.synchronize()
t_warm = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "build_s": t_build - t_import,
                  "warm_up_s": t_warm - t_build, "total_s": t_warm - t0,
                  "execution": info["execution"], "variants": info["variants"],
                  "captures": info["captures"], "card": torch.cuda.get_device_name(0)}))
"""


def run_once(params: str, dtype: str, cache: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=f"{cache}/triton",
               TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor")
    out = subprocess.run([sys.executable, "-c", CHILD, params, dtype], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "config" / "default.yaml"))
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = run_once(args.params, args.dtype, cache)
        warm = run_once(args.params, args.dtype, cache)
    card = cold["card"].replace(" ", "-")
    print(f"{'caches':>6} {'import s':>9} {'build s':>8} {'warm-up s':>10} {'total s':>8}  "
          f"({card}, {args.dtype}, {cold['execution']}, {cold['variants']} variants)")
    for name, row in (("cold", cold), ("warm", warm)):
        print(f"{name:>6} {row['import_s']:>9.2f} {row['build_s']:>8.2f} {row['warm_up_s']:>10.2f} "
              f"{row['total_s']:>8.2f}")
    doc = {"machine": card, "dtype": args.dtype, "params": args.params,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "cold": cold, "warm": warm}
    out = ROOT / "bench" / "results" / f"configure_time_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
