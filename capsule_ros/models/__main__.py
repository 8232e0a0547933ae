"""``python -m capsule_ros.models --list``: every family, its tiny config, and what loading it gives.

Each family's tiny config (``config/models/tiny_<model_type>.json``) is built with a seed and bound
through the registry; the JSON names its buffers per kind and the state bytes per kind: per token
of context for KV, constant for conv and recurrent state. ``--family NAME`` limits the list;
``--config FILE`` loads one more config file (e.g. the default).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..capsule import Kind
from .hybrid import HybridModel, ModelSpec
from .registry import FAMILIES, tiny_config


def summarize(bound: HybridModel) -> dict:
    """Layout summary: buffers and bytes per kind (KV per token; conv/recurrent constant)."""
    kinds: dict[str, dict] = {}
    for spec in bound.live.layout.specs:
        k = kinds.setdefault(spec.kind.value, {"buffers": 0, "layers": set(), "bytes": 0})
        k["buffers"] += 1
        k["layers"].add(int(spec.name[1:].split(".")[0]))
        k["bytes"] += spec.row_elems * spec.dtype.itemsize
    out = {}
    for kind, k in kinds.items():
        key = "bytes_per_token" if kind == Kind.KV.value else "bytes_constant"
        out[kind] = {"buffers": k["buffers"], "layers": sorted(k["layers"]), key: k["bytes"]}
    return out


def load_one(config_file: str, max_len: int) -> dict:
    t0 = time.perf_counter()
    try:
        bound = HybridModel.load(ModelSpec(config_file=config_file, max_len=max_len))
    except Exception as e:  # report and go on: one broken family must not hide the others
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    cfg = bound.model.config
    return {
        "ok": True,
        "load_s": round(time.perf_counter() - t0, 3),
        "params": sum(p.numel() for p in bound.model.parameters()),
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "max_len": bound.max_len,
        "layout": summarize(bound),
        "kv_bytes_per_token": bound.live.layout.kv_row_bytes(),
        "state_bytes_constant": bound.live.layout.state_bytes(),
        "fingerprint_layout": bound.fingerprint.layout,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m capsule_ros.models", description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list families and load each tiny config")
    ap.add_argument("--family", action="append", default=[], help="only these model types")
    ap.add_argument("--config", action="append", default=[], help="also load this config file")
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args(argv)
    if not args.list and not args.config:
        ap.print_help()
        return 2
    unknown = sorted(set(args.family) - set(FAMILIES))
    if unknown:
        print(f"unknown famil(ies) {unknown}; known: {sorted(FAMILIES)}", file=sys.stderr)
        return 2
    out = {"families": []}
    for name, family in FAMILIES.items():
        if args.family and name not in args.family:
            continue
        path = tiny_config(name)
        entry = family.describe()
        entry["tiny_config"] = str(path)
        entry["load"] = load_one(str(path), args.max_len) if args.list else None
        out["families"].append(entry)
    if args.config:
        out["configs"] = [{"config": c, "load": load_one(c, args.max_len)} for c in args.config]
    print(json.dumps(out, indent=2))
    failed = [e for e in out["families"] + out.get("configs", []) if e["load"] and not e["load"]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
