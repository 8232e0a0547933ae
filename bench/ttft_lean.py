"""Time to first token and decode on the lean CUDA path (issue 10), beside plain transformers.

    python bench/ttft_lean.py --prefixes 2048,8192,16384 --suffixes 32,7

Per (model, prefix, suffix), one row appended to bench/results/ttft_lean_<card>.json as soon as
it is measured (rerun with other prefixes to complete it; a row with the same key is replaced):
* capsule_ttft_ms: restore the stream's capsule + append the suffix + first token, alternating
  two streams so that every timed query restores for real (the live buffers hold the other one);
* decode_ms: one decode step (graph replay + greedy token), median;
* cold_lean_ms: our cold path (the same lean graphs from the empty state, same chunk plan);
  cold_transformers_ms: one transformers forward of prefix + suffix with a fresh cache;
* bytes_per_decode_step / bytes_per_append: weights read once, recurrent + conv state read and
  written, the valid K/V read and the new rows written; thor_floor_ms = those bytes at 273 GB/s;
* kernels_per_decode / decode_gpu_us: kernels launched by one uncaptured lean decode step and
  their summed GPU time (torch.profiler): the launch-bound part is decode_ms minus that sum.
Host timer with a device synchronize around each timed region: what a caller waits for.

Correctness (2026-11-29): the lean step matches transformers to 1e-5 (float32, H200) with every
kernel choice; a chunk size captured on first use, without warm_up, used to replay the capture's
probe inputs (fixed in graphs.LeanRunner.append). This benchmark warms up first, so its replays
were never of that kind.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsule_ros.capsule.fingerprint import hash_text  # noqa: E402
from capsule_ros.models.hybrid import HybridModel, ModelSpec  # noqa: E402
from capsule_ros.runtime.engine import Engine  # noqa: E402

THOR_BW = 273e9


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def commit_id() -> str:
    if Path(".commit").is_file():  # a copy of the tree without its git history (the GPU machine)
        return Path(".commit").read_text().strip()
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def build(entry: dict, max_len: int):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    cfg = CONFIG_MAPPING[entry["model_type"]](**entry["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.cuda().eval()
    hm = HybridModel.bind(model, ModelSpec(dtype="bfloat16", device="cuda", max_len=max_len),
                          hash_text(json.dumps(entry, sort_keys=True)))
    return model, hm


def step_bytes(hm: HybridModel, context: int, new_rows: int) -> int:
    """Bytes one step must move at least: weights (not the embedding table), state r+w, K/V."""
    emb = hm.model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in hm.model.parameters()
                  if p.data_ptr() != emb.data_ptr() or hm.model.config.tie_word_embeddings)
    const = 0
    kv_row = 0
    for s in hm.live.layout.specs:
        t = hm.live.view(s.name)
        if s.seq_axis is None:
            const += t.numel() * t.element_size()
        else:
            kv_row += t.numel() * t.element_size() // t.shape[s.seq_axis]
    return weights + 2 * const + kv_row * (context + new_rows)


def profile_decode(hm: HybridModel) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile
    x = hm.embed_tokens([5])
    hm.runner.append(x, replay=False)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        hm.runner.append(x, replay=False)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return len(evs), sum(e.device_time for e in evs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(Path(__file__).with_name("models.json")))
    ap.add_argument("--only", default="")
    ap.add_argument("--prefixes", default="2048,4096,8192,16384")
    ap.add_argument("--suffixes", default="32,7")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--compile-glue", action="store_true", help="inductor-fused norms/SwiGLU")
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0).replace(" ", "-")
    path = Path(args.out) / f"ttft_lean_{card}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"card": card, "rows": []}
    models = json.loads(Path(args.models).read_text())["models"]
    prefixes = [int(p) for p in args.prefixes.split(",")]
    suffixes = [int(s) for s in args.suffixes.split(",")]
    commit = commit_id()
    for name, entry in models.items():
        if args.only and name not in args.only.split(","):
            continue
        max_len = max(prefixes) + max(suffixes) + 64
        model, hm = build(entry, max_len)
        t0 = time.perf_counter()
        hm.enable_graphs(lean=True, compile_glue=args.compile_glue)
        configure_s = time.perf_counter() - t0
        info = hm.warm_up()
        print(f"{name}: execution {hm.execution} ({hm.lean_error or 'ok'}); configure {configure_s:.1f} s, "
              f"warm_up {info['seconds']:.1f} s, {info['captures']} graphs", flush=True)
        engine = Engine(hm, chunk_size=max_len)
        emb = hm.token_embedding()
        gen = torch.Generator(device="cuda").manual_seed(1)
        vocab = entry["config"]["vocab_size"]
        kernels, gpu_us = profile_decode(hm)
        engine.invalidate()
        for prefix in prefixes:
            ids = {s: torch.randint(1, vocab, (prefix + max(suffixes),), device="cuda", generator=gen)
                   for s in ("A", "B")}
            for s in ("A", "B"):
                if s in engine.store:
                    engine.drop(s)
                engine.add_stream(s)
                engine.query(s, emb(ids[s][:prefix]), act=lambda h: None)
                engine.commit()
            for suffix in suffixes:
                full = ids["A"][:prefix + suffix]
                with torch.no_grad():
                    def cold_tf():
                        model(input_ids=full[None], use_cache=True, logits_to_keep=1)
                    cold_tf_ms = timed(cold_tf, 3, warmup=1)

                    def cold_ours():
                        engine._restore(engine.empty)
                        h = hm.forward(emb(full))
                        hm.next_token(h[-1])
                        engine.abort()
                    cold_ms = timed(cold_ours, 3, warmup=1)
                    state = {"i": 0}

                    def capsule_query():
                        s = "AB"[state["i"] % 2]
                        state["i"] += 1
                        r = engine.query(s, emb(ids[s][prefix:prefix + suffix]), act=hm.next_token)
                        engine.abort()
                        return r
                    ttft_ms = timed(capsule_query, args.repeats)
                    engine.restore("A")
                    hm.forward(emb(ids["A"][prefix:prefix + suffix]))
                    tok = torch.tensor([7], device="cuda")

                    def decode():
                        hm.next_token(hm.forward(emb(tok))[-1])
                    decode_ms = timed(decode, args.repeats)
                    engine.abort()
                    flip = {"i": 0}

                    def restore():
                        flip["i"] += 1
                        engine.restore("AB"[flip["i"] % 2])
                    restore_ms = timed(restore, args.repeats)
                bd = step_bytes(hm, prefix + suffix, 1)
                ba = step_bytes(hm, prefix, suffix)
                row = {"model": name, "prefix": prefix, "suffix": suffix, "commit": commit,
                       "compile_glue": args.compile_glue,
                       "card": card, "execution": hm.execution,
                       "capsule_ttft_ms": round(ttft_ms, 3), "decode_ms": round(decode_ms, 3),
                       "restore_ms": round(restore_ms, 4),
                       "cold_lean_ms": round(cold_ms, 2), "cold_transformers_ms": round(cold_tf_ms, 2),
                       "speedup_vs_transformers": round(cold_tf_ms / ttft_ms, 1),
                       "speedup_vs_our_cold": round(cold_ms / ttft_ms, 1),
                       "bytes_per_decode_step": bd, "bytes_per_append": ba,
                       "thor_floor_ms": round(ba / THOR_BW * 1e3, 3),
                       "thor_floor_decode_ms": round(bd / THOR_BW * 1e3, 3),
                       "h200_floor_decode_ms": round(bd / 4.0e12 * 1e3, 3),
                       "kernels_per_decode": kernels, "decode_gpu_us": round(gpu_us, 1),
                       "configure_s": round(configure_s, 1), "warm_up_s": round(info["seconds"], 1)}
                key = (name, prefix, suffix, args.compile_glue)
                doc["rows"] = [r for r in doc["rows"] if (r["model"], r["prefix"], r.get("suffix"),
                                                         r.get("compile_glue", False)) != key] + [row]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(doc, indent=1) + "\n")
                print(json.dumps(row), flush=True)
        del engine, hm, model
        torch.cuda.empty_cache()
    cols = ["model", "prefix", "suffix", "compile_glue", "capsule_ttft_ms", "decode_ms", "restore_ms", "cold_lean_ms",
            "cold_transformers_ms", "kernels_per_decode", "decode_gpu_us", "thor_floor_ms"]
    print(" | ".join(cols))
    for r in doc["rows"]:
        print(" | ".join(str(r.get(c)) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
