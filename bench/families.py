"""Query latency per model family: restore / append / act / commit, median of N queries.

Every family's tiny config (``config/models/tiny_<type>.json``) and the embedded default are built
with a seed and bound through the registry. Two streams alternate, so every query restores its
stream's capsule (the worst case for stream switching); each query appends 17 tokens (a 4x4
patch image plus one joint-state token, like the default streams) and acts with a continuous head
(horizon 8 x dof 7), then commits. Prints a table and writes ``bench/results/families_<label>.json``.

    python -P bench/families.py [--label cpu-2c] [--queries 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from capsule_ros.models import FAMILIES, HybridModel, ModelSpec
from capsule_ros.models.registry import tiny_config
from capsule_ros.config import resolve
from capsule_ros.policy.heads import ContinuousActionHead
from capsule_ros.runtime.engine import Engine

TOKENS = 17
PARTS = ("restore_ms", "append_ms", "act_ms", "commit_ms")


def bench(config_file: str, queries: int, warmup: int, max_len: int, chunk: int) -> dict:
    t0 = time.perf_counter()
    model = HybridModel.load(ModelSpec(config_file=config_file, max_len=max_len))
    load_s = time.perf_counter() - t0
    engine = Engine(model, chunk_size=chunk, context_policy="reset")
    head = ContinuousActionHead(model.hidden_size, 8, 7, 0.1, seed=0).eval()
    streams = ("a", "b")
    for s in streams:
        engine.add_stream(s)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for i in range(warmup + queries):
            stream = streams[i % 2]
            embeds = torch.randn(TOKENS, model.hidden_size, generator=gen) * 0.02
            r = engine.query(stream, embeds, act=head)
            commit_ms = engine.commit()
            if i >= warmup:
                assert r.restored, "alternating streams must restore"
                rows.append({"restore_ms": r.restore_ms, "append_ms": r.append_ms,
                             "act_ms": r.act_ms, "commit_ms": commit_ms})
    med = {p: statistics.median(row[p] for row in rows) for p in PARTS}
    med["total_ms"] = sum(med[p] for p in PARTS)
    layout = model.live.layout
    return {"model_type": model.model.config.model_type, "config": Path(config_file).name,
            "params": sum(p.numel() for p in model.model.parameters()),
            "layers": model.model.config.num_hidden_layers, "hidden": model.hidden_size,
            "kv_bytes_per_token": layout.kv_row_bytes(), "state_bytes": layout.state_bytes(),
            "load_s": round(load_s, 3), "median": {k: round(v, 3) for k, v in med.items()},
            "p90_total_ms": round(sorted(sum(r[p] for p in PARTS) for r in rows)[int(0.9 * len(rows))], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="cpu-2c")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: shared 2-core box, see the note in the JSON)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--family", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [str(tiny_config(f)) for f in FAMILIES if not args.family or f in args.family]
    if not args.family:
        configs.append(resolve("config/models/default_qwen3_5.json"))
    results = []
    for c in configs:
        results.append(bench(c, args.queries, args.warmup, args.max_len, args.chunk))
        r = results[-1]
        print(f"  {r['config']}: total {r['median']['total_ms']:.2f} ms", flush=True)
    head = f"{'config':32} {'params':>8} {'restore':>8} {'append':>8} {'act':>7} {'commit':>7} {'total':>8}  (ms, median of {args.queries}, {TOKENS}-token append, {args.label})"
    print(head)
    for r in results:
        m = r["median"]
        print(f"{r['config']:32} {r['params']:>8} {m['restore_ms']:>8.3f} {m['append_ms']:>8.3f} "
              f"{m['act_ms']:>7.3f} {m['commit_ms']:>7.3f} {m['total_ms']:>8.3f}")
    doc = {"label": args.label, "machine": {"platform": platform.platform(),
                                            "processor": platform.processor() or platform.machine(),
                                            "cpus": os.cpu_count(), "torch_threads": args.threads,
                                            "loadavg_at_end": os.getloadavg()},
           "torch": torch.__version__, "queries": args.queries, "warmup": args.warmup,
           "append_tokens": TOKENS, "max_len": args.max_len, "chunk_size": args.chunk,
           "note": "two streams alternate, so every query restores; act = continuous head 8x7; "
                   "the machine is shared with other jobs, so figures are noisy",
           "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"families_{args.label}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
