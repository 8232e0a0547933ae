"""Time to first token and decode on a GPU: cold prefill vs restoring a capsule (issues 5 and 10).

    python bench/ttft.py --execution lean-cuda+step --prefixes 2048,4096,8192,16384 --suffixes 32,7
    python bench/ttft.py --execution lean-cuda+step --only qwen3_5_4b --prefixes 16384 --roofline
    python bench/ttft.py --report          # table + plot from the JSON, nothing measured

Resumable: each (model, execution, prefix, suffix) row is written to
``bench/results/ttft_<card>.json`` as soon as it is measured (a row with the same key is
replaced), so the table can be completed over several shorter runs; ``--report`` rebuilds the
table and ``ttft_<card>.png`` from the rows of one commit (the newest, unless ``--commit``).

Per row (random weights, bf16, models from bench/models.json; ``execution`` as the node's
``model.cuda_step``: lean-cuda+step, lean-cuda+glue, lean-cuda, graph):
* capsule_ttft_ms: restore the stream's capsule + append the suffix + first token (greedy, on
  the device), alternating two streams so every timed query restores for real;
* decode_ms: one decode step (append one token + greedy token), median;
* restore_ms against restore_floor_ms (capsule bytes read + written at the measured device copy
  rate) and the target 1.5 x floor + 20 us;
* cold_ms: our cold path (the same runner from the empty state, the same chunk plan);
  cold_transformers_ms: plain transformers, one forward of prefix + suffix with a fresh cache
  (the fla / mamba-ssm kernels it picks up in use); same_first_token: the capsule path's token
  equals that forward's; where not, first_token_gap_ours / _transformers say by how many logit
  units each side prefers its own token (beside logits_std: a near-tie is bf16 rounding);
* bytes_per_decode_step / bytes_per_append: weights read once (the LM head included, the input
  embedding table not), recurrent + conv state read and written, the valid K/V read and the new
  rows written; thor_floor_ms / thor_floor_decode_ms: those bytes at 273 GB/s (Jetson AGX Thor);
* kernels_per_decode, decode_gpu_us: kernels one uncaptured decode step launches and their
  summed GPU time (torch.profiler): decode_ms minus that is launch gaps and host work. The same
  profile per model for a decode step and a 16-row chunk (a 7-token suffix) goes to the
  ``profiles`` table: GPU time per kind of kernel (matmul, attention, state kernels, inductor's
  fused kernels, copies), every kernel by name, costliest first, and every matrix product by its
  input shapes (calls, GPU time of what they launched).
``--roofline`` adds, per layer kind, the time of one decode step through only the layers of that
kind (captured, replayed; divided by their number) beside the bytes each layer must move.
``--compile-only`` builds, compiles and warms up each model and measures nothing: it fills the
inductor and Triton caches (compiling is CPU work, so it can run beside ``make gpu-test``) for a
later run with the same prefixes, suffixes and ``--roofline``, whose configure then takes ~27 s
instead of ~140 s for qwen3_5_text on an H200.
Host timer with a device synchronize around each timed region: what a caller waits for. Each
phase frees what it allocated before the next (a 4B model at 16k fits beside transformers' own
16k forward).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from capsule_ros.capsule.fingerprint import hash_text  # noqa: E402
from capsule_ros.models.hybrid import HybridModel, ModelSpec  # noqa: E402
from capsule_ros.models.lean import compile_mode_of  # noqa: E402
from capsule_ros.runtime.engine import Engine  # noqa: E402
from capsule_ros.runtime.figures import percentile  # noqa: E402

THOR_BW = 273e9          # Jetson AGX Thor memory bandwidth, bytes/s
EXECUTIONS = ("lean-cuda+step", "lean-cuda+glue", "lean-cuda", "graph")


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and 99th percentile (below 100 repeats: the largest) wall ms, device synchronized."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), percentile(ts, 99)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy rate: bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms, _ = timed(lambda: b.copy_(a), 10)
    return 2 * nbytes / (ms / 1e3)  # the buffers go with this frame


def commit_id() -> str:
    if Path(".commit").is_file():  # a copy of the tree without its git history (the GPU machine)
        return Path(".commit").read_text().strip()
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(entry: dict, max_len: int, execution: str, chunks: tuple[int, ...] = (1, 16, 64, 512)
          ) -> tuple[torch.nn.Module, HybridModel, float]:
    """The model of ``entry`` (seeded random weights, bf16, on the GPU) bound with the graph
    runner ``execution`` names, one graph per chunk size; and the seconds that took (compile)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    cfg = CONFIG_MAPPING[entry["model_type"]](**entry["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.cuda().eval()
    hm = HybridModel.bind(model, ModelSpec(dtype="bfloat16", device="cuda", max_len=max_len),
                          hash_text(json.dumps(entry, sort_keys=True)))
    t0 = time.perf_counter()
    mode = compile_mode_of(execution)
    hm.enable_graphs(max_chunk=max(chunks), lean=mode is not None, chunks=chunks,
                     compile=mode or "none")
    if hm.execution != execution:
        raise SystemExit(f"asked for {execution}, got {hm.execution}: {hm.lean_error}")
    return model, hm, time.perf_counter() - t0


def weight_bytes(module: torch.nn.Module, skip: torch.Tensor | None = None) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() in seen or (skip is not None and p.data_ptr() == skip.data_ptr()):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def state_bytes(hm: HybridModel, names: list[str], context: int, new_rows: int) -> int:
    """Constant state read + written; K/V: ``context`` rows read, ``new_rows`` written."""
    total = 0
    for s in hm.live.layout.specs:
        if s.name not in names:
            continue
        t = hm.live.view(s.name)
        nbytes = t.numel() * t.element_size()
        if s.seq_axis is None:
            total += 2 * nbytes
        else:
            total += nbytes // t.shape[s.seq_axis] * (context + new_rows)
    return total


def step_bytes(hm: HybridModel, context: int, new_rows: int) -> int:
    """What one step must move at least (see the module docstring)."""
    emb = hm.model.get_input_embeddings().weight
    tied = hm.model.config.tie_word_embeddings
    weights = weight_bytes(hm.model, skip=None if tied else emb)
    return weights + state_bytes(hm, [s.name for s in hm.live.layout.specs], context, new_rows)


# kernel name patterns -> what they do (first match wins; the rest is "other"). cuBLAS on sm90
# names its kernels nvjet_*; inductor's kernels (triton_poi/per/red_fused_...) come before the
# copies, as their names carry the ops they fuse ("_to_copy": a cast), a flex-attention one
# before them both.
KERNEL_KINDS = (("matmul", ("nvjet", "gemv", "gemm", "cutlass", "xmma", "cublas", "splitk",
                            "skinny", "row_kernel", "rows_kernel")),
                ("attention", ("flex",)),
                ("gated delta rule", ("gated_delta",)),
                ("mamba2 state", ("selective", "ssd", "chunk_scan", "chunk_state",
                                  "state_passing", "bmm_chunk")),
                ("inductor fused", ("triton_",)),
                ("copy / fill", ("memcpy", "memset", "copy", "fill")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, parts in KERNEL_KINDS:
        if any(p in low for p in parts):
            return kind
    return "other"


def is_annotation(name: str) -> bool:
    """A ``record_function`` range on the GPU timeline, not a kernel: inductor wraps each compiled
    graph's call in ``## Call CompiledFxGraph <hash> ##``, which a profile that records the CPU
    side reports among the CUDA events, spanning the whole (profiled, so slowed) step."""
    return name.startswith("## ") and name.endswith(" ##")


def summarize(per_name: dict[str, tuple[int, float]]) -> dict:
    """Kernels, GPU us, and both per kind and per kernel name, from {kernel name: (launches, us)};
    annotation ranges left out. Also re-summarizes a stored profile (``resummarize``)."""
    names = {k: v for k, v in per_name.items() if not is_annotation(k)}
    kinds: dict[str, list] = {}
    for name, (n, us) in names.items():
        entry = kinds.setdefault(kernel_kind(name), [0, 0.0])
        entry[0] += n
        entry[1] += us
    return {"kernels": sum(n for n, _ in names.values()),
            "gpu_us": round(sum(us for _, us in names.values()), 1),
            "by_kind": {k: {"kernels": n, "us": round(us, 1)} for k, (n, us) in
                        sorted(kinds.items(), key=lambda kv: -kv[1][1])},
            # every kernel name (a few dozen), costliest first: a later classification can redo by_kind
            "top_kernels": [{"name": k[:120], "kernels": n, "us": round(us, 1)}
                            for k, (n, us) in sorted(names.items(), key=lambda kv: -kv[1][1])]}


def resummarize(profile: dict) -> dict:
    """A stored profile with its totals and kinds recomputed from its own per-name list (after a
    change of ``kernel_kind`` or ``is_annotation``)."""
    per_name = {t["name"]: (t["kernels"], t["us"]) for t in profile["top_kernels"]}
    return {**profile, **summarize(per_name)}


def profile_step(hm: HybridModel, rows: int) -> dict:
    """One uncaptured step of ``rows`` tokens (the runner's eager path: the same kernels, launched
    one by one): kernels launched, their summed GPU time, and both per kind and per kernel name."""
    from torch.profiler import ProfilerActivity, profile
    x = hm.embed_tokens([5] * rows)
    hm.use_graphs = False
    try:
        hm.forward(x)
        # the CPU side too, with shapes: which product (op, shapes) launched which GPU time
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     record_shapes=True) as prof:
            hm.forward(x)
            sync()
    finally:
        hm.use_graphs = True
    per_name: dict[str, tuple[int, float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False):
            n, us = per_name.get(e.name, (0, 0.0))
            per_name[e.name] = (n + 1, us + e.device_time)
    return {"rows": rows, **summarize(per_name), "products": matmul_shapes(prof)}


# the ops that launch the products (aten::linear and aten::matmul call mm/addmm: not counted twice)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "capsule_ros::skinny_mm")


def matmul_shapes(prof) -> list[dict]:
    """Per matmul op and input shapes: calls and the GPU time of the kernels they launched."""
    out = [{"op": a.key, "shapes": str(a.input_shapes)[:160], "calls": a.count,
            "us": round(a.device_time_total, 1)}
           for a in prof.key_averages(group_by_input_shape=True) if a.key in MATMUL_OPS]
    return sorted(out, key=lambda r: -r["us"])


@torch.no_grad()
def roofline(hm: HybridModel, context: int, bw: float, repeats: int = 50) -> list[dict]:
    """Per layer kind: one decode step through only those layers, captured and replayed, per
    layer; beside its bytes (weights, state read + written, K/V read at ``context``)."""
    runner, lean = hm.runner, hm.runner.lean_model
    kinds = sorted({layer.kind for layer in lean.layers})
    out, graphs = [], []  # kept to the end: a pool whose graphs are all freed is gone
    with runner.kept_state():
        x = runner._inputs[1]
        x.normal_()
        runner.pos.fill_(context)
        runner.n.fill_(1)
        for kind in kinds + ["all"]:
            only = None if kind == "all" else kind
            graph, _ = runner.record(lambda: lean.step(x, runner.pos, runner.n, only))
            ms, _ = timed(graph.replay, repeats)
            graphs.append(graph)
            layers = [i for i, layer in enumerate(lean.layers) if only is None or layer.kind == only]
            mods = [hm.model.model.layers[i] for i in layers]
            names = [s.name for s in hm.live.layout.specs if int(s.name.split(".")[0][1:]) in layers]
            nbytes = sum(weight_bytes(m) for m in mods) + state_bytes(hm, names, context, 1)
            per = len(layers)
            out.append({"kind": kind, "layers": per, "context": context,
                        "us_per_layer": round(ms * 1e3 / per, 2),
                        "bytes_per_layer": nbytes // per,
                        "achieved_GBps": round(nbytes / (ms / 1e3) / 1e9, 1),
                        "card_floor_us_per_layer": round(nbytes / per / bw * 1e6, 2),
                        "thor_floor_us_per_layer": round(nbytes / per / THOR_BW * 1e6, 2)})
    return out


@torch.no_grad()
def compile_roofline_steps(hm: HybridModel) -> None:
    """Compile the per-kind steps ``roofline`` captures (uncaptured, on kept state)."""
    runner, lean = hm.runner, hm.runner.lean_model
    with runner.kept_state():
        runner.n.fill_(1)
        for kind in sorted({layer.kind for layer in lean.layers}):
            lean.step(runner._inputs[1], runner.pos, runner.n, kind)
        sync()


def measure(name: str, entry: dict, execution: str, prefixes: list[int], suffixes: list[int],
            repeats: int, bw: float, commit: str, do_roofline: bool, save,
            compile_only: bool = False) -> None:
    max_len = max(prefixes) + max(suffixes) + 64  # part of every compiled shape: keep it per run
    model, hm, configure_s = build(entry, max_len, execution)
    info = hm.warm_up()
    print(f"{name}: {hm.execution}; configure {configure_s:.1f} s, warm_up {info['seconds']:.1f} s, "
          f"{info['captures']} graphs", flush=True)
    if compile_only:
        if do_roofline and hm.runner.lean:
            compile_roofline_steps(hm)
        with torch.no_grad():  # transformers' own Triton kernels (fla, mamba-ssm) built once too
            ids = torch.randint(1, entry["config"]["vocab_size"], (1, 1024), device="cuda")
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return
    engine = Engine(hm, chunk_size=max_len)  # the runner plans its own chunks
    emb = hm.token_embedding()
    gen = torch.Generator(device="cuda").manual_seed(1)
    vocab = entry["config"]["vocab_size"]
    kernels = gpu_us = None
    for rows in (1, 16):  # decode; a 7-token suffix's chunk
        try:
            p = profile_step(hm, rows)
        except Exception as e:  # noqa: BLE001 - a profiler that fails costs the profile, not the rows
            print(f"{name}: no profile of {rows} rows: {e!r}", flush=True)
            continue
        save("profiles", {"model": name, "execution": execution, "commit": commit, **p})
        if rows == 1:
            kernels, gpu_us = p["kernels"], p["gpu_us"]
    engine.invalidate()  # the profiled steps appended to the live state behind the engine's back
    with torch.no_grad():
        for prefix in prefixes:
            ids = {s: torch.randint(1, vocab, (prefix + max(suffixes),), device="cuda", generator=gen)
                   for s in ("A", "B")}
            for s in ("A", "B"):
                if s in engine.store:
                    engine.drop(s)
                engine.add_stream(s)
                engine.query(s, emb(ids[s][:prefix]), act=lambda h: None)
                engine.commit()
            if do_roofline:
                for r in roofline(hm, prefix, bw):
                    save("roofline", {"model": name, "execution": execution, "commit": commit, **r})
            for suffix in suffixes:
                full = ids["A"][:prefix + suffix]

                def cold_transformers() -> torch.Tensor:
                    out = model(input_ids=full[None], use_cache=True, logits_to_keep=1)
                    return out.logits[0, -1].float()
                tf_logits = cold_transformers()
                tf_token = int(tf_logits.argmax())
                cold_tf_ms, _ = timed(cold_transformers, 3, warmup=1)
                torch.cuda.empty_cache()  # transformers' 16k activations go before the next phase

                def cold_ours() -> None:
                    engine._restore(engine.empty)
                    hm.next_token(hm.forward(emb(full))[-1])
                    engine.abort()
                cold_ms, _ = timed(cold_ours, 3, warmup=1)
                turn = {"i": 0}

                def capsule_query() -> None:
                    s = "AB"[turn["i"] % 2]
                    turn["i"] += 1
                    engine.query(s, emb(ids[s][prefix:prefix + suffix]), act=hm.next_token)
                    engine.abort()  # not committed: every query starts from the prefix capsule
                ttft_ms, ttft_p99 = timed(capsule_query, repeats)
                engine.restore("A")
                last = hm.forward(emb(full[prefix:]))[-1]
                first = hm.next_token(last)
                ours = hm.logits(last).float().reshape(-1)
                # a different first token: by how much each side prefers its own (logit units;
                # random weights give near-ties that bf16 rounding differences can flip)
                gap_ours = float(ours[first] - ours[tf_token])
                gap_tf = float(tf_logits[tf_token] - tf_logits[first])
                tok = torch.tensor([first], device="cuda")

                def decode() -> None:
                    hm.next_token(hm.forward(emb(tok))[-1])
                decode_ms, decode_p99 = timed(decode, repeats)
                engine.abort()
                flip = {"i": 0}

                def restore() -> None:  # alternate, so each restore really copies
                    flip["i"] += 1
                    engine.restore("AB"[flip["i"] % 2])
                restore_ms, _ = timed(restore, repeats)
                floor = 2 * engine.boundary("A").nbytes / bw * 1e3
                bd, ba = step_bytes(hm, prefix + suffix, 1), step_bytes(hm, prefix, suffix)
                save("rows", {
                    "model": name, "execution": execution, "prefix": prefix, "suffix": suffix,
                    "commit": commit, "capsule_ttft_ms": round(ttft_ms, 3),
                    "capsule_ttft_p99_ms": round(ttft_p99, 3), "decode_ms": round(decode_ms, 3),
                    "decode_p99_ms": round(decode_p99, 3), "restore_ms": round(restore_ms, 4),
                    "restore_floor_ms": round(floor, 4),
                    "restore_target_ms": round(1.5 * floor + 0.02, 4),
                    "cold_ms": round(cold_ms, 2), "cold_transformers_ms": round(cold_tf_ms, 2),
                    "speedup_vs_transformers": round(cold_tf_ms / ttft_ms, 1),
                    "speedup_vs_our_cold": round(cold_ms / ttft_ms, 1),
                    "same_first_token": first == tf_token,
                    "first_token_gap_ours": round(gap_ours, 4),
                    "first_token_gap_transformers": round(gap_tf, 4),
                    "logits_std": round(float(tf_logits.std()), 3),
                    "bytes_per_decode_step": bd, "bytes_per_append": ba,
                    "thor_floor_ms": round(ba / THOR_BW * 1e3, 3),
                    "thor_floor_decode_ms": round(bd / THOR_BW * 1e3, 3),
                    "card_floor_decode_ms": round(bd / bw * 1e3, 3),
                    "kernels_per_decode": kernels, "decode_gpu_us": gpu_us,
                    "configure_s": round(configure_s, 1), "warm_up_s": round(info["seconds"], 1)})
            torch.cuda.empty_cache()
    # the model, its state and every capsule go with this frame (the caller empties the cache)


COLUMNS = ["model", "execution", "prefix", "suffix", "capsule_ttft_ms", "decode_ms", "restore_ms",
           "restore_target_ms", "cold_ms", "cold_transformers_ms", "speedup_vs_transformers",
           "speedup_vs_our_cold", "same_first_token", "kernels_per_decode", "decode_gpu_us",
           "thor_floor_ms"]
ROOF_COLUMNS = ["model", "execution", "context", "kind", "layers", "us_per_layer", "bytes_per_layer",
                "achieved_GBps", "card_floor_us_per_layer", "thor_floor_us_per_layer"]


def report(doc: dict, path: Path, commit: str | None) -> None:
    rows = doc.get("rows", [])
    if not rows:
        print("no rows")
        return
    commit = commit or rows[-1]["commit"]
    rows = [r for r in rows if r["commit"] == commit]
    print(f"rows of commit {commit} ({doc['card']}, torch {doc.get('torch')})")
    for cols, items in ((COLUMNS, rows), (ROOF_COLUMNS, [r for r in doc.get("roofline", [])
                                                         if r["commit"] == commit])):
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in items:
            print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    profiles = [p for p in doc.get("profiles", []) if p["commit"] == commit]
    if profiles:
        print("| model | rows | kind | kernels | GPU us |")
        print("|---|---:|---|---:|---:|")
        for p in profiles:
            for kind, v in p["by_kind"].items():
                print(f"| {p['model']} | {p['rows']} | {kind} | {v['kernels']} | {v['us']} |")
        print("| model | rows | kernel (costliest 8) | kind now | launches | GPU us |")
        print("|---|---:|---|---|---:|---:|")
        for p in profiles:
            for k in p["top_kernels"][:8]:
                print(f"| {p['model']} | {p['rows']} | {k['name'][:60]} | {kernel_kind(k['name'])} | "
                      f"{k['kernels']} | {k['us']} |")
        with_products = [p for p in profiles if p.get("products")]
        if with_products:
            print("| model | rows | product | input shapes | calls | GPU us |")
            print("|---|---:|---|---|---:|---:|")
            for p in with_products:
                for r in p["products"][:8]:
                    print(f"| {p['model']} | {p['rows']} | {r['op']} | {r['shapes']} | {r['calls']} | {r['us']} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for model in sorted({r["model"] for r in rows}):
        for execution in sorted({r["execution"] for r in rows if r["model"] == model}):
            mine = sorted((r for r in rows if r["model"] == model and r["execution"] == execution
                           and r["suffix"] == 32), key=lambda r: r["prefix"])
            if not mine:
                continue
            x = [r["prefix"] for r in mine]
            ax.plot(x, [r["cold_transformers_ms"] for r in mine], "o:", label=f"{model} cold, transformers")
            ax.plot(x, [r["cold_ms"] for r in mine], "s--", label=f"{model} cold, ours ({execution})")
            ax.plot(x, [r["capsule_ttft_ms"] for r in mine], "^-", label=f"{model} capsule ({execution})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix tokens (+ 32-token observation)")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"TTFT, cold vs capsule ({doc['card']}, bf16, commit {commit})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(Path(__file__).with_name("models.json")))
    ap.add_argument("--only", default="", help="comma-separated model names (default: the required two)")
    ap.add_argument("--execution", default="lean-cuda+step", choices=EXECUTIONS)
    ap.add_argument("--prefixes", default="2048,4096,8192,16384")
    ap.add_argument("--suffixes", default="32,7")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--roofline", action="store_true", help="per-layer-kind roofline at each prefix")
    ap.add_argument("--report", action="store_true", help="table and plot from the JSON only")
    ap.add_argument("--compile-only", action="store_true",
                    help="build, compile and warm up each model, measure nothing: fills the inductor "
                         "and Triton caches (e.g. beside make gpu-test) for a later run with the same "
                         "--prefixes, --suffixes and --roofline")
    ap.add_argument("--commit", default=None, help="--report: the rows of this commit")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else None
    out = Path(args.out)
    if args.report:
        found = sorted(out.glob("ttft_*.json")) if card is None else [out / f"ttft_{card}.json"]
        for path in found:
            report(json.loads(path.read_text()), path, args.commit)
        return 0
    if card is None:
        print("bench/ttft.py needs a CUDA GPU (or --report)", file=sys.stderr)
        return 2
    path = out / f"ttft_{card}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if "rows" in doc and doc["rows"] and "execution" not in doc["rows"][0]:
        doc = {}  # the old, non-resumable format: start over
    doc.update(card=card, torch=torch.__version__)
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    doc["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    print(f"card {card}; device copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    keys = {"rows": ("model", "execution", "prefix", "suffix"),
            "roofline": ("model", "execution", "context", "kind"),
            "profiles": ("model", "execution", "rows")}

    def save(table: str, row: dict) -> None:
        key = tuple(row[k] for k in keys[table])
        doc[table] = [r for r in doc.get(table, []) if tuple(r[k] for k in keys[table]) != key] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    models = json.loads(Path(args.models).read_text())["models"]
    only = [m for m in args.only.split(",") if m] or [m for m, e in models.items() if e.get("required")]
    commit = commit_id()
    for name in only:
        measure(name, models[name], args.execution, [int(p) for p in args.prefixes.split(",")],
                [int(s) for s in args.suffixes.split(",")], args.repeats, bw, commit,
                args.roofline, save, args.compile_only)
        torch.cuda.empty_cache()
    if args.compile_only:
        return 0
    report(doc, path, commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
