"""Torch eager vs ONNX Runtime on the same model and the same capsules (issue 14's benchmark).

    python bench/backends.py [--models config/models/default_qwen3_5.json,...] [--prefix 512]
                             [--suffix 32] [--append-chunk 0,32] [--export-dir DIR] [--machine cpu-2c]

Per model: the prefix capsules are made once on the torch backend (two streams, different
prefixes) and installed on both backends (the ONNX engine accepts the other execution path), so
both continue from byte-identical state. Then, alternating the two streams so every query
restores (each query is aborted, so the boundary stays):
* restore_ms: the engine's restore of the stream's boundary (one copy per region);
* append_ms: appending ``--suffix`` tokens (torch: one chunked forward; ONNX: one session run per
  token unless the export has an append graph: see ``append`` in the row);
* decode_ms: one more token (embed, step, logits, argmax) inside the query;
* ttft_ms: restore + append + first token (the capsule TTFT);
* tokens_equal_torch: the first 16 greedy tokens after the capsule equal the torch backend's.
Host wall time, medians. Writes bench/results/backends_<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from capsule_ros.capsule.execution import accepting_other_execution  # noqa: E402
from capsule_ros.models.hybrid import HybridModel, ModelSpec  # noqa: E402
from capsule_ros.runtime.engine import Engine  # noqa: E402


def _ids(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def measure(engine: Engine, suffix: torch.Tensor, repeats: int) -> dict[str, float]:
    model = engine.model
    rows: dict[str, list[float]] = {"restore_ms": [], "append_ms": [], "decode_ms": [], "ttft_ms": []}
    for i in range(repeats + 1):  # the first round warms up
        stream = "a" if i % 2 == 0 else "b"

        def first(h: torch.Tensor) -> int:
            return int(model.logits(h).argmax())
        t0 = time.perf_counter()
        r = engine.query(stream, model.embed_tokens(suffix), act=first)
        ttft = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        h = engine.extend(model.embed_tokens([r.output]))
        int(model.logits(h[-1]).argmax())
        decode = (time.perf_counter() - t1) * 1e3
        engine.abort()
        assert r.restored, "every timed query must restore"
        if i:
            rows["restore_ms"].append(r.restore_ms)
            rows["append_ms"].append(r.append_ms)
            rows["decode_ms"].append(decode)
            rows["ttft_ms"].append(ttft)
    return {k: round(statistics.median(v), 3) for k, v in rows.items()}


def greedy(engine: Engine, stream: str, suffix: torch.Tensor, steps: int = 16) -> list[int]:
    model = engine.model
    r = engine.query(stream, model.embed_tokens(suffix), act=lambda h: int(model.logits(h).argmax()))
    tokens = [r.output]
    for _ in range(steps - 1):
        h = engine.extend(model.embed_tokens([tokens[-1]]))
        tokens.append(int(model.logits(h[-1]).argmax()))
    engine.abort()
    return tokens


def run_model(config: str, args: argparse.Namespace, export_root: Path) -> list[dict]:
    from capsule_ros.export.onnx_export import export_model
    from capsule_ros.runtime.onnx_backend import OnnxModel
    max_len = max(1024, 1 << (args.prefix + args.suffix + 64).bit_length())
    spec = ModelSpec(config_file=config, max_len=max_len)
    tm = HybridModel.load(spec)
    vocab = tm.model.config.vocab_size
    te = Engine(tm, chunk_size=64)
    for name, seed in (("a", 1), ("b", 2)):  # the capsules, made once on torch
        te.add_stream(name)
        te.query(name, tm.embed_tokens(_ids(args.prefix, seed, vocab)), act=lambda h: None)
        te.commit()
    capsules = {s: te.boundary(s) for s in ("a", "b")}
    suffix = _ids(args.suffix, 3, vocab)
    reference = greedy(te, "a", suffix)
    variants: list[tuple[str, Engine, dict]] = [("torch-eager", te, {})]
    for chunk in (int(c) for c in str(args.append_chunk).split(",")):
        out_dir = export_root / f"{Path(config).stem}-a{chunk}"
        manifest_path = out_dir / "capsule_onnx.json"
        if manifest_path.is_file():  # an export kept from an earlier run (--export-dir)
            manifest = json.loads(manifest_path.read_text())
        else:
            manifest = export_model(spec, out_dir, append_chunk=chunk)
        om = OnnxModel.load(out_dir, max_len, threads=args.threads)
        om.fingerprint = accepting_other_execution(om.fingerprint)  # the same capsules on both
        oe = Engine(om, chunk_size=64)
        for s, c in capsules.items():
            oe.install(s, c)
        om.warm_up()
        variants.append((f"onnxruntime-cpu{f' (append {chunk})' if chunk > 1 else ''}", oe,
                         {"export_s": manifest["export_seconds"], "append": manifest["append"],
                          "windows": om.describe()["windows"]}))
    rows = []
    for backend, engine, extra in variants:
        same = greedy(engine, "a", suffix) == reference
        row = {"backend": backend, "model": Path(config).name, "prefix": args.prefix,
               "suffix": args.suffix, "threads": args.threads, **measure(engine, suffix, args.repeats),
               "tokens_equal_torch": same, **extra}
        rows.append(row)
        print(f"| {row['model']} | {backend} | {row['restore_ms']:.3f} | {row['append_ms']:.2f} | "
              f"{row['decode_ms']:.3f} | {row['ttft_ms']:.2f} | {same} |", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="config/models/default_qwen3_5.json,config/models/tiny_bamba.json")
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append-chunk", default="0,32", help="ONNX variants: 0 = appends as decode "
                    "steps, N = with the N-token append step exported (comma-separated)")
    ap.add_argument("--machine", default=f"cpu-{os.cpu_count()}c")
    ap.add_argument("--export-dir", default="", help="keep exports here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print("| model | backend | restore ms | append ms | decode ms | TTFT ms | tokens = torch |")
    print("|---|---|---:|---:|---:|---:|---|")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.export_dir or tmp)
        for config in args.models.split(","):
            rows += run_model(str(ROOT / config) if not Path(config).is_absolute() else config, args, root)
    import onnxruntime
    doc = {"machine": args.machine, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "rows": rows}
    out = ROOT / "bench" / "results" / f"backends_{args.machine}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
