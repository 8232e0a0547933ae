#!/usr/bin/env python3
"""Capsule operation costs against context length, beside the memcpy floor.

For a model config and contexts 512 .. 16k it measures, on the real capsule mechanism
(``capsule_ros.capsule.capsule``) over the model's real state layout:

* snapshot      full freeze of the live state at ``context`` (valid KV rows + all state)
* restore       that capsule back into the live buffers (in place)
* commit        delta commit: 32 tokens appended after the restored boundary, then a commit with
                the boundary as parent (copies the 32 new KV rows + the constant-size state)
* full_commit   the same boundary committed without a parent (copies every valid KV row)
* floor         (bytes read + bytes written) of a full snapshot/restore over the large-copy
                bandwidth measured on this machine; ``delta_floor_ms`` is the same for a delta
                commit

The live buffers are filled by direct writes of random data into the KV rows and the state
regions (the benchmark measures copies, not the model: filling 16k tokens with the model takes
minutes on a small CPU). The model is built once at a small context only to derive its layout.
Times are medians of ``--repeats`` runs; on CUDA they use events after a synchronize.

    python bench/capsule_ops.py --model config/models/default_qwen3_5.json [--device cuda]

Prints a table and writes ``bench/results/capsule_ops_<machine>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from capsule_ros.capsule import capsule as capsule_ops  # noqa: E402
from capsule_ros.capsule.fingerprint import Fingerprint  # noqa: E402
from capsule_ros.capsule.layout import BufferSpec, Kind, LiveState, StateLayout, dtype_from_name  # noqa: E402

APPEND = 32
DEFAULT_CONTEXTS = "512,1024,2048,4096,8192,16384"


def machine_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return f"cpu-{os.cpu_count()}c"


class Timer:
    """Median wall time of a callable: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def __call__(self, fn, setup=None) -> float:
        return statistics.median(self.samples(fn, setup))

    def samples(self, fn, setup=None) -> list[float]:
        times = []
        for i in range(self.repeats + 1):  # the first run warms up
            if setup is not None:
                setup()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize(self.device)
                ms = start.elapsed_time(stop)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if i:
                times.append(ms)
        return times


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes read + written per second of one large contiguous copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


def fill(live: LiveState, rows: slice, gen: torch.Generator) -> None:
    """Random data straight into KV rows and every state region (no model involved)."""
    for region in live.kv_regions().values():
        part = region[rows]
        part.copy_(torch.randn(part.shape, generator=gen).to(part.dtype))
    for region in live.state_regions().values():
        region.copy_(torch.randn(region.shape, generator=gen).to(region.dtype))


def model_layout(config: str, layout_from: str | None = None):
    """(buffer specs, empty meta, fingerprint) of a model config: from the model itself, or
    from a results JSON written earlier (``layout`` entry), for machines without the model stack
    (e.g. a GPU box with another transformers version): the copies need only the layout."""
    if layout_from:
        doc = json.loads(Path(layout_from).read_text())
        entry = next(m for m in doc["models"] if Path(m["model"]).name == Path(config).name)
        specs = tuple(BufferSpec(b["name"], Kind(b["kind"]), dtype_from_name(b["dtype"]),
                                 tuple(b["shape"]), b["seq_axis"]) for b in entry["layout"]["buffers"])
        fp = Fingerprint(weights="bench", dtype="float32", layout="", device="", versions="")
        return specs, dict(entry["empty_meta"]), fp
    from capsule_ros.models.hybrid import HybridModel, ModelSpec
    small = HybridModel.load(ModelSpec(config_file=config, max_len=64, device="cpu"))
    return small.live.layout.specs, small.read_meta(), small.fingerprint


def bench_model(config: str, contexts: list[int], device: torch.device, repeats: int, bw: float,
                timer: Timer, layout_from: str | None = None) -> dict:
    specs, meta, fp0 = model_layout(config, layout_from)
    rows = []
    for ctx in contexts:
        layout = StateLayout(specs, ctx + APPEND)
        fp = dataclasses.replace(fp0, layout=layout.digest(), device=device.type)
        live = LiveState(layout, device)
        gen = torch.Generator().manual_seed(ctx)
        fill(live, slice(0, ctx), gen)
        meta_at = {**meta, "position": ctx}
        boundary = capsule_ops.snapshot(live, fingerprint=fp, position=ctx, meta=meta_at)
        state_bytes = boundary.nbytes
        snapshot_ms = timer(lambda: capsule_ops.snapshot(live, fingerprint=fp, position=ctx, meta=meta_at))
        restore_ms = timer(lambda: capsule_ops.restore(boundary, live, fp))
        # 32 appended tokens: new KV rows and a new state, written directly (not timed).
        capsule_ops.restore(boundary, live, fp)
        fill(live, slice(ctx, ctx + APPEND), gen)
        meta_new = {**meta, "position": ctx + APPEND}
        commit_samples = timer.samples(lambda: capsule_ops.snapshot(live, fingerprint=fp, position=ctx + APPEND,
                                                                  meta=meta_new, parent=boundary))
        commit_ms = statistics.median(commit_samples)
        full_commit_ms = timer(lambda: capsule_ops.snapshot(live, fingerprint=fp, position=ctx + APPEND,
                                                          meta=meta_new))
        delta_bytes = APPEND * layout.kv_row_bytes() + layout.state_bytes()
        rows.append({
            "context": ctx, "state_bytes": state_bytes,
            "snapshot_ms": round(snapshot_ms, 4), "restore_ms": round(restore_ms, 4),
            "commit_ms": round(commit_ms, 4), "full_commit_ms": round(full_commit_ms, 4),
            "floor_ms": round(2 * state_bytes / bw * 1e3, 4),
            "delta_floor_ms": round(2 * delta_bytes / bw * 1e3, 4),
            "commit_min_ms": round(min(commit_samples), 4),
        })
        r = rows[-1]
        print(f"{ctx:>7} {state_bytes / 2**20:>10.2f} {r['snapshot_ms']:>11.3f} {r['restore_ms']:>10.3f} "
              f"{r['commit_ms']:>10.3f} {r['full_commit_ms']:>13.3f} {r['floor_ms']:>9.3f} "
              f"{r['restore_ms'] / r['floor_ms']:>8.2f}x", flush=True)
        del live, boundary
    return {"model": config, "kv_row_bytes": StateLayout(specs, 1).kv_row_bytes(),
            "const_state_bytes": StateLayout(specs, 1).state_bytes(), "rows": rows,
            "layout": StateLayout(specs, 1).describe(), "empty_meta": meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append",
                    help="model config (repeatable); default: the default and bench_cpu_large")
    ap.add_argument("--contexts", default=DEFAULT_CONTEXTS)
    ap.add_argument("--machine", default=None, help="label for the results file (default cpu-<n>c / GPU name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None, help="default 7 on CPU, 50 on CUDA")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared CPU a 2-thread copy waits for "
                         "a descheduled straggler thread, ~24 ms steps in the timings)")
    ap.add_argument("--layout-from", default=None,
                    help="take the state layouts from an earlier results JSON (no model build)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        torch.set_num_threads(args.threads)
    models = args.model or ["config/models/default_qwen3_5.json", "config/models/bench_cpu_large.json"]
    contexts = [int(c) for c in args.contexts.split(",")]
    repeats = args.repeats or (50 if device.type == "cuda" else 21)
    timer = Timer(device, repeats)
    machine = args.machine or machine_label(device)
    bw = copy_bandwidth(device, timer, (1 << 30) if device.type == "cuda" else (256 << 20))
    print(f"machine {machine}  device {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"large-copy bandwidth (read + write): {bw / 1e9:.2f} GB/s; medians of {repeats} runs")
    print("live buffers filled by direct writes of random data into KV rows and state "
          "(copies are measured, not the model)")
    results = []
    for config in models:
        path = str(ROOT / config) if not Path(config).is_absolute() else config
        print(f"\nmodel {config}")
        print(f"{'context':>7} {'state MiB':>10} {'snapshot ms':>11} {'restore ms':>10} {'commit ms':>10} "
              f"{'full commit ms':>13} {'floor ms':>9} {'restore/floor':>8}")
        res = bench_model(path, contexts, device, repeats, bw, timer, args.layout_from)
        res["model"] = config
        by_ctx = {r["context"]: r for r in res["rows"]}
        if 1024 in by_ctx and max(by_ctx) >= 16384:
            hi, lo = by_ctx[max(by_ctx)], by_ctx[1024]
            ratio = hi["commit_ms"] / lo["commit_ms"]
            ratio_min = hi["commit_min_ms"] / lo["commit_min_ms"]
            res["delta_commit_ratio_16k_over_1k"] = round(ratio, 3)
            res["delta_commit_ratio_16k_over_1k_min"] = round(ratio_min, 3)
            print(f"delta commit {max(by_ctx)} / 1024: {ratio:.2f}x median, {ratio_min:.2f}x min "
                  f"(target <= 1.5x)")
        results.append(res)
    doc = {"machine": machine, "device": str(device), "torch": torch.__version__,
           "copy_bandwidth_GBps": round(bw / 1e9, 3), "repeats": repeats, "append_tokens": APPEND,
           "fill": "direct writes of random data into KV rows and state (no model forward)",
           "model": results[0]["model"], "rows": results[0]["rows"], "models": results}
    write_results(doc, args.out or ROOT / "bench" / "results" / f"capsule_ops_{machine}.json")


def write_results(doc: dict, out: str | Path) -> Path:
    """Write a benchmark's JSON document (creating bench/results/) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    return out


if __name__ == "__main__":
    main()
