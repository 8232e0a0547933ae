"""Time to first token: cold prefill vs restoring a capsule, on a GPU (issue 5's benchmark).

    python bench/ttft.py --models bench/models.json --prefixes 2048,4096,8192,16384 --suffix 32

For each model (random weights, bf16) and prefix length P:
* cold_transformers_ms: plain transformers, one forward of prefix+suffix with a fresh cache,
  first token = argmax of the last logits; the kernels it picks up (fla, mamba_ssm) are in use.
* cold_ms: our best cold path (the faster of: one eager forward through the live state, and the
  graph-bound chunked prefill from empty), first token included.
* capsule_ttft_ms: restore the stream's capsule + append the suffix (graph replays) + first
  token, timed while alternating two streams with different prefixes, so every timing includes
  a real restore (the live buffers always hold the other stream).
* restore_ms vs restore_floor_ms (capsule bytes read + written over a measured large copy);
  snapshot_ms (a full-copy commit); decode_ms (one graph-bound decode step, greedy, on device).
* correctness: max |logit difference| of the capsule path's first-token logits against a float32
  cold reference (plain transformers, same weights), same first token, and the number of the
  first 16 greedy tokens that agree before the first difference.
Host timer with a device synchronize around each timed region: what a caller waits for.
Writes bench/results/ttft_<card>.json and ttft_<card>.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from capsule_ros.capsule import capsule as capsule_ops  # noqa: E402
from capsule_ros.capsule.fingerprint import hash_text  # noqa: E402
from capsule_ros.models.hybrid import HybridModel, ModelSpec  # noqa: E402
from capsule_ros.runtime.engine import Engine  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time in ms (device synchronized) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy rate, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms, _ = timed(lambda: b.copy_(a), 10, warmup=2)
    del a, b
    return 2 * nbytes / (ms / 1e3)


def build(model_type: str, config: dict, seed: int):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    cfg = CONFIG_MAPPING[model_type](**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return ref.eval()


@torch.no_grad()
def reference_tokens(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Plain transformers greedy decode: first-token logits and ``steps`` tokens."""
    out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    tokens = [int(logits.argmax())]
    cache = out.past_key_values
    for _ in range(steps - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=ids.device), past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return logits, tokens


def agree_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_model(name: str, entry: dict, prefixes: list[int], suffix: int, repeats: int,
              decode_steps: int, bw: float) -> list[dict]:
    ref32 = build(entry["model_type"], entry["config"], seed=0).cuda()
    model16 = copy.deepcopy(ref32).to(torch.bfloat16)
    max_len = max(prefixes) + suffix + decode_steps + 8
    spec = ModelSpec(dtype="bfloat16", device="cuda", max_len=max_len)
    hm = HybridModel.bind(model16, spec, hash_text(json.dumps(entry, sort_keys=True)))
    hm.enable_graphs(max_chunk=512)
    engine = Engine(hm, chunk_size=max_len)  # the runner splits into captured chunks itself
    embed = hm.token_embedding()
    gen = torch.Generator(device="cuda").manual_seed(1)
    vocab = entry["config"]["vocab_size"]
    rows = []
    for prefix in prefixes:
        ids = {s: torch.randint(1, vocab, (prefix + suffix,), device="cuda", generator=gen)
               for s in ("A", "B")}
        for s in ("A", "B"):
            if s in engine.store:
                engine.drop(s)
            engine.add_stream(s)
            # the capsule: prefix appended from empty through the graph-bound path
            engine.query(s, embed(ids[s][:prefix]), act=lambda h: None)
            engine.commit()
        full = ids["A"]

        # -- cold paths ------------------------------------------------------------------
        def cold_transformers():
            out = model16(input_ids=full[None], use_cache=True, logits_to_keep=1)
            return int(out.logits[0, -1].argmax())
        cold_tf_ms, tf_token = timed(cold_transformers, max(3, repeats // 4))

        def cold_ours(graphs: bool):
            def run():
                hm.use_graphs = graphs
                engine._restore(engine.empty)
                hidden = hm.forward(embed(full))
                token = hm.next_token(hidden[-1])
                engine.abort()
                return token
            return run
        cold_graph_ms, cold_token = timed(cold_ours(True), max(3, repeats // 4))
        cold_eager_ms, _ = timed(cold_ours(False), max(3, repeats // 4))
        hm.use_graphs = True

        # -- capsule path: alternate streams so each query restores for real -----------------
        order = ["A", "B"]
        state = {"i": 0}

        def capsule_query():
            s = order[state["i"] % 2]
            state["i"] += 1
            r = engine.query(s, embed(ids[s][prefix:]), act=hm.next_token)
            engine.abort()  # not committed: every query starts from the same prefix capsule
            return r
        ttft_ms, _ = timed(capsule_query, repeats, warmup=2)

        capsule = engine.boundary("A")
        flip = {"i": 0}

        def restore_other_stream():  # alternate, so each restore really copies
            flip["i"] += 1
            engine.restore("A" if flip["i"] % 2 else "B")
        restore_ms, _ = timed(restore_other_stream, repeats, warmup=2)
        restore_floor_ms = 2 * capsule.nbytes / bw * 1e3
        engine.restore("A")
        snapshot_ms, _ = timed(lambda: capsule_ops.snapshot(
            hm.live, fingerprint=hm.fingerprint, position=hm.position, meta=hm.read_meta()),
            repeats, warmup=1)

        # -- first token and greedy agreement against float32 -----------------------------
        engine.restore("A")
        hidden = hm.forward(embed(full[prefix:]))
        logits16 = hm.logits(hidden[-1]).float()
        ours = [hm.next_token(hidden[-1])]
        decode_times = []
        for _ in range(decode_steps - 1):
            sync()
            t0 = time.perf_counter()
            h = hm.forward(embed(torch.tensor([ours[-1]], device="cuda")))
            tok = hm.next_token(h[-1])
            sync()
            decode_times.append((time.perf_counter() - t0) * 1e3)
            ours.append(tok)
        engine.abort()
        ref_logits, ref_tokens = reference_tokens(ref32, full, decode_steps)
        row = {
            "model": name, "prefix": prefix,
            "cold_ms": round(min(cold_graph_ms, cold_eager_ms), 3),
            "cold_transformers_ms": round(cold_tf_ms, 3),
            "capsule_ttft_ms": round(ttft_ms, 3),
            "restore_ms": round(restore_ms, 4), "restore_floor_ms": round(restore_floor_ms, 4),
            "decode_ms": round(statistics.median(decode_times), 3),
            "same_first_token": ours[0] == ref_tokens[0],
            "agree_tokens": agree_prefix(ours, ref_tokens),
            "max_dlogit": round(float((logits16 - ref_logits).abs().max()), 4),
            # extras
            "cold_graph_ms": round(cold_graph_ms, 3), "cold_eager_ms": round(cold_eager_ms, 3),
            "cold_first_token_matches_capsule": cold_token == ours[0],
            "transformers_first_token_matches": tf_token == ours[0],
            "snapshot_ms": round(snapshot_ms, 4), "capsule_bytes": capsule.nbytes,
            "speedup": round(min(cold_graph_ms, cold_eager_ms, cold_tf_ms) / ttft_ms, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    del hm, engine, model16, ref32
    torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path, card: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        x = [r["prefix"] for r in mine]
        ax.plot(x, [r["cold_transformers_ms"] for r in mine], "o:", label=f"{model} cold (transformers)")
        ax.plot(x, [r["cold_ms"] for r in mine], "s--", label=f"{model} cold (ours)")
        ax.plot(x, [r["capsule_ttft_ms"] for r in mine], "^-", label=f"{model} capsule")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix tokens (+32-token observation)")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"TTFT, cold vs capsule ({card}, bf16)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(Path(__file__).with_name("models.json")))
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--prefixes", default="2048,4096,8192,16384")
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/ttft.py needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0).replace(" ", "-")
    models = json.loads(Path(args.models).read_text())["models"]
    only = [m for m in args.only.split(",") if m]
    prefixes = [int(p) for p in args.prefixes.split(",")]
    bw = copy_bandwidth()
    print(f"card {card}; device copy {bw / 1e12:.2f} TB/s (read+write)", flush=True)
    rows = []
    for name, entry in models.items():
        if not only or name in only:
            rows += run_model(name, entry, prefixes, args.suffix, args.repeats, args.decode_steps, bw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"card": card, "copy_bandwidth_TBps": round(bw / 1e12, 3), "torch": torch.__version__,
           "rows": rows}
    (out / f"ttft_{card}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, out / f"ttft_{card}.png", card)
    cols = ["model", "prefix", "cold_transformers_ms", "cold_ms", "capsule_ttft_ms", "speedup",
            "restore_ms", "restore_floor_ms", "decode_ms", "same_first_token", "agree_tokens", "max_dlogit"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
