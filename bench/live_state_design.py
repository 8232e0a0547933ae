#!/usr/bin/env python3
"""Stream switching: one live buffer set + restore copy, vs resident per-stream buffer sets.

(a) ``single``: what the engine does. One live buffer set; switching to a stream restores its
    committed capsule (a copy of the valid KV rows + all conv/recurrent state) into it, then
    writes the metadata (flags, position).
(b) ``resident``: every stream owns a full buffer set (equivalently a slot index into one arena
    of N sets); switching re-points the model's cache at that stream's views
    (``hybrid._point_cache_at``) and writes the metadata: O(1) in the context.

Both keep each stream's committed capsule (history/rollback need it either way), so the memory
columns count the live buffer sets only: (a) one set, (b) one per stream. Switch time is the
median over round-robin switches between the streams, each stream at ``context`` tokens, filled
by direct writes of random data (copies are measured, not the model). Runs on CPU or CUDA.

    python bench/live_state_design.py [--device cuda] [--streams 2,4] [--contexts 1024,4096,16384]

Prints a table and writes ``bench/results/live_state_design_<machine>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from capsule_ops import Timer, fill, machine_label, model_layout, write_results  # noqa: E402
from capsule_ros.capsule import capsule as capsule_ops  # noqa: E402
from capsule_ros.capsule.layout import LiveState, StateLayout  # noqa: E402


class _StandIn:
    """Without the model stack (``--layout-from``): re-point a cache-like table of named views and
    write the metadata -- the same O(1) work as ``hybrid._point_cache_at`` + ``write_meta``."""

    def __init__(self, live: LiveState, meta: dict) -> None:
        self.table = dict(live.views)
        self.meta = dict(meta)

    def point(self, live: LiveState) -> None:
        for name, view in live.views.items():
            self.table[name] = view

    def write_meta(self, meta: dict) -> None:
        self.meta.update(meta)


def run(config: str, contexts: list[int], streams: list[int], device: torch.device, timer: Timer,
        layout_from: str | None = None) -> list[dict]:
    specs, meta0, fp0 = model_layout(str(ROOT / config), layout_from)
    if layout_from:
        m = _StandIn(LiveState(StateLayout(specs, 1), "cpu"), meta0)
        point, restore_cache = m.point, (lambda: None)
    else:
        from capsule_ros.models.hybrid import HybridModel, ModelSpec, _point_cache_at
        m = HybridModel.load(ModelSpec(config_file=str(ROOT / config), max_len=64, device="cpu"))
        point = lambda live: _point_cache_at(m.cache, live)  # noqa: E731
        restore_cache = lambda: _point_cache_at(m.cache, m.live)  # noqa: E731
    rows = []
    for ctx in contexts:
        layout = StateLayout(specs, ctx)
        fp = dataclasses.replace(fp0, layout=layout.digest(), device=device.type)
        set_bytes = ctx * layout.kv_row_bytes() + layout.state_bytes()
        for n in streams:
            gen = torch.Generator().manual_seed(ctx * 10 + n)
            meta = {**meta0, "position": ctx}
            # (b) resident: one full buffer set per stream
            sets = []
            for _ in range(n):
                ls = LiveState(layout, device)
                fill(ls, slice(0, ctx), gen)
                sets.append(ls)
            # (a) single: one live set, one capsule per stream (the streams' boundaries)
            capsules = [capsule_ops.snapshot(ls, fingerprint=fp, position=ctx, meta=meta) for ls in sets]
            single = sets[0]
            k = {"i": 0}

            def switch_single():
                k["i"] = (k["i"] + 1) % n
                capsule_ops.restore(capsules[k["i"]], single, fp)
                m.write_meta(meta)

            def switch_resident():
                k["i"] = (k["i"] + 1) % n
                point(sets[k["i"]])
                m.write_meta(meta)

            single_ms = timer(switch_single)
            resident_ms = timer(switch_resident)
            restore_cache()  # give the model its own buffers back
            rows.append({
                "model": config, "context": ctx, "streams": n,
                "capsule_bytes": capsules[0].nbytes,
                "single_switch_ms": round(single_ms, 4), "resident_switch_ms": round(resident_ms, 4),
                "single_live_bytes": set_bytes, "resident_live_bytes": n * set_bytes,
                "extra_bytes_resident": (n - 1) * set_bytes,
            })
            r = rows[-1]
            print(f"{Path(config).stem:>20} {ctx:>7} {n:>3} {r['capsule_bytes'] / 2**20:>9.1f} "
                  f"{single_ms:>10.3f} {resident_ms:>11.4f} {set_bytes / 2**20:>10.1f} "
                  f"{n * set_bytes / 2**20:>11.1f}", flush=True)
            del sets, capsules, single
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--streams", default="2,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see capsule_ops.py)")
    ap.add_argument("--layout-from", default=None,
                    help="state layouts from a capsule_ops results JSON (no model build)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    models = args.model or ["config/models/default_qwen3_5.json", "config/models/bench_cpu_large.json"]
    repeats = args.repeats or (50 if device.type == "cuda" else 15)
    timer = Timer(device, repeats)
    machine = args.machine or machine_label(device)
    print(f"machine {machine}  device {device}  torch {torch.__version__}; medians of {repeats} switches")
    print("buffers filled by direct writes of random data (copies are measured, not the model)")
    print(f"{'model':>20} {'context':>7} {'N':>3} {'capsule MiB':>9} {'(a) copy ms':>10} "
          f"{'(b) repoint ms':>11} {'(a) live MiB':>10} {'(b) live MiB':>11}")
    rows = []
    for config in models:
        rows += run(config, [int(c) for c in args.contexts.split(",")],
                    [int(s) for s in args.streams.split(",")], device, timer, args.layout_from)
    doc = {"machine": machine, "device": str(device), "torch": torch.__version__, "repeats": repeats,
           "designs": {"single": "one live buffer set, switch = restore copy of the valid bytes",
                       "resident": "a buffer set per stream, switch = re-point the cache (O(1))"},
           "rows": rows}
    write_results(doc, args.out or ROOT / "bench" / "results" / f"live_state_design_{machine}.json")


if __name__ == "__main__":
    main()
