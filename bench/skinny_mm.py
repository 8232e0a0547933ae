"""Few-row matmuls on a GPU: cuBLAS (``x @ w.T``) vs the skinny Triton kernels, side by side.

    python bench/skinny_mm.py                    # every projection shape of bench/models.json
    python bench/skinny_mm.py --step qwen3_5_text   # + the whole lean decode step, per policy
    python bench/skinny_mm.py --rows "" --step bamba  # the step alone

Per (rows, N, K): both kernels captured in CUDA graphs that each run the product over ``--copies``
distinct weight copies in turn (more bytes than the L2 holds, so every weight comes from HBM),
replayed ``--repeats`` times; us per product and the weight bytes per second. ``--step`` also
builds the model's lean step (compiled whole, bf16) once per matmul policy (``POLICIES``) and
times one captured decode step each (the LM head included), side by side in one process, with
its logits' relative difference from cuBLAS's. Writes ``bench/results/skinny_mm_<card>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # run from a checkout

from capsule_ros.kernels.skinny_mm import MAX_ROWS, skinny_mm  # noqa: E402
from ttft import build, commit_id, timed  # noqa: E402

# Products of one row by a weight of at most this many elements (4 MiB in bf16) are where the
# skinny kernel beat cuBLAS by 1.4-3x (results/skinny_mm_NVIDIA-H200.json: 1024x1024, 1024x2048,
# 1536x1024); on larger weights cuBLAS mostly won (0.75-0.97x; 2560x4096: 1.1x for the skinny).
SMALL_WEIGHT = 1 << 21
POLICIES = ("cublas", "skinny", "small-one-row")


def uses_skinny(policy: str, rows: int, n: int, k: int) -> bool:
    """Whether ``policy`` sends a ``rows`` x ``k`` times ``k`` x ``n`` product to the skinny kernel:
    "cublas" never (the node's setting), "skinny" up to MAX_ROWS rows, "small-one-row" one row
    by a weight of at most SMALL_WEIGHT elements."""
    if policy == "skinny":
        return rows <= MAX_ROWS
    if policy == "small-one-row":
        return rows == 1 and n * k <= SMALL_WEIGHT
    if policy == "cublas":
        return False
    raise ValueError(f"unknown matmul policy {policy!r} (have {POLICIES})")


@contextlib.contextmanager
def matmul_policy(policy: str):
    """Models built inside take their products by ``policy``: the bench wraps ``LeanModel._mm``
    for the time of one build (a candidate measured here, not a path the node can take); what the
    policy leaves to cuBLAS goes through the node's own ``_mm``."""
    from capsule_ros.kernels import ops
    from capsule_ros.models import lean
    original = lean.LeanModel._mm

    def _mm(self, x, w):
        if self.cuda and uses_skinny(policy, x.shape[0], w.shape[0], w.shape[1]):
            return ops.skinny_mm(x, w)
        return original(self, x, w)
    lean.LeanModel._mm = _mm
    try:
        yield
    finally:
        lean.LeanModel._mm = original


def shapes(entry: dict) -> set[tuple[int, int]]:
    """(N, K) of every projection a lean step of this model runs, from a meta-device build."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    cfg = CONFIG_MAPPING[entry["model_type"]](**entry["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out = set()
    for layer in model.model.layers:
        merged: dict[str, list[int]] = {}  # the lean step merges the projections of one input
        for name, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            block, leaf = name.split(".")[0], name.split(".")[-1]  # mixer or MLP; projection
            if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") or leaf.startswith("in_proj"):
                n, k = merged.setdefault(block, [0, mod.in_features])
                merged[block] = [n + mod.out_features, k]
            else:
                out.add((mod.out_features, mod.in_features))
        out.update((n, k) for n, k in merged.values())
    return out


def product(rows: int, n: int, k: int, copies: int, repeats: int) -> dict:
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    row = {"rows": rows, "N": n, "K": k, "weight_MB": round(n * k * 2 / 1e6, 2)}
    for name, fn in (("cublas", lambda w: x @ w.t()), ("skinny", lambda w: skinny_mm(x, w))):
        for w in ws[:2]:
            fn(w)  # compile / pick the kernel outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in ws:
                fn(w)
        ms, _ = timed(graph.replay, repeats)
        us = ms * 1e3 / copies
        row[f"{name}_us"] = round(us, 2)
        row[f"{name}_TBps"] = round(n * k * 2 / (us / 1e6) / 1e12, 2)
    row["speedup"] = round(row["cublas_us"] / row["skinny_us"], 2)
    return row


def decode_step(entry: dict, policy: str, repeats: int) -> dict:
    with matmul_policy(policy):
        _, hm, compile_s = build(entry, 4096, "lean-cuda+step", chunks=(1,))
        runner = hm.runner
        cap = runner.capture(1)
    with torch.no_grad(), runner.kept_state():
        g = torch.Generator(device="cuda").manual_seed(5)
        runner._inputs[1].copy_(torch.randn(1, hm.hidden_size, device="cuda", generator=g))
        runner.pos.fill_(2048)
        runner.n.fill_(1)
        ms, p99 = timed(cap.graph.replay, repeats)
        cap.graph.replay()
        logits = cap.logits.float().clone()
    return {"policy": policy, "decode_step_ms": round(ms, 4), "p99_ms": round(p99, 4),
            "compile_s": round(compile_s, 1), "logits": logits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(Path(__file__).with_name("models.json")))
    ap.add_argument("--rows", default="1,16,64", help='row counts of the product table ("": none)')
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--step", default="", help="also time the whole lean decode step of these "
                    "models (comma-separated), once per matmul policy")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/skinny_mm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0).replace(" ", "-")
    models = json.loads(Path(args.models).read_text())["models"]
    todo = sorted(set().union(*(shapes(e) for e in models.values())))
    doc = {"card": card, "commit": commit_id(), "torch": torch.__version__, "products": [], "step": []}
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",") if r):
            for n, k in todo:
                row = product(rows, n, k, args.copies, args.repeats)
                doc["products"].append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    for name in (m for m in args.step.split(",") if m):
        runs = [decode_step(models[name], policy, args.repeats * 4) for policy in POLICIES]
        base = runs[0]["logits"]
        for run in runs:
            logits = run.pop("logits")
            doc["step"].append({"model": name, **run,
                                "logits_rel_vs_cublas": float((logits - base).norm() / base.norm())})
            print(json.dumps(doc["step"][-1]), flush=True)
        torch.cuda.empty_cache()
    out = Path(args.out) / f"skinny_mm_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("| rows | N | K | MB | cuBLAS us | TB/s | skinny us | TB/s | x |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in doc["products"]:
        print(f"| {r['rows']} | {r['N']} | {r['K']} | {r['weight_MB']} | {r['cublas_us']} | "
              f"{r['cublas_TBps']} | {r['skinny_us']} | {r['skinny_TBps']} | {r['speedup']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
