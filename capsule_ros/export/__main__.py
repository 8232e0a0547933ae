"""``python -m capsule_ros.export --config FILE | --path CHECKPOINT --out DIR``: export the step
of one model (or, with ``--families``, of every family's tiny config into DIR/<family>/).

Prints one JSON line per model: what exported (decode, append), or why not. Exit 1 when any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m capsule_ros.export", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="model config JSON (config/models/*.json), built with --seed")
    src.add_argument("--path", help="local checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--families", action="store_true", help="every family's tiny config")
    ap.add_argument("--out", required=True, help="export directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=4096, help="the layout's context length "
                    "(the graphs take any; the node rebuilds the layout at model.max_context)")
    ap.add_argument("--append-chunk", type=int, default=0,
                    help="also try the N-token append step (0: appends run as decode steps)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from ..models import FAMILIES, ModelSpec
    from ..models.registry import tiny_config
    from .onnx_export import export_model
    torch.set_num_threads(args.threads)
    jobs: list[tuple[str, ModelSpec, Path]] = []
    out = Path(args.out)
    if args.families:
        jobs = [(f, ModelSpec(config_file=str(tiny_config(f)), seed=args.seed, max_len=args.max_len),
                 out / f) for f in sorted(FAMILIES)]
    else:
        spec = ModelSpec(config_file=args.config, path=args.path, seed=args.seed, max_len=args.max_len)
        jobs = [(args.config or args.path, spec, out)]
    failed = 0
    for name, spec, dest in jobs:
        try:
            man = export_model(spec, dest, append_chunk=args.append_chunk)
            print(json.dumps({"model": name, "ok": True, "out": str(dest), "graphs": man["graphs"],
                              "append": man["append"], "seconds": man["export_seconds"]}), flush=True)
        except Exception as e:  # noqa: BLE001 - report each model, go on with the next
            failed += 1
            print(json.dumps({"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
