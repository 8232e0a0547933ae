#!/usr/bin/env bash
# For whoever has a Jetson AGX Thor: what works there, in one JSON file to send back.
#   scripts/thor_check.sh [OUT.json]      (default thor_check_<host>.json)
# Run in a shell set up as docs/THOR.md says (ROS underlay, venv, install/setup.bash sourced).
# 1. the doctor (--json, device cuda, the default parameters)
# 2. capsule restore/commit on the GPU vs thor_floor_ms: the bytes read + written over Thor's
#    273 GB/s memory bandwidth (spec), and vs the copy bandwidth measured there
# 3. the bundled bag replayed through the node (capsule_ros.demo) with model.device: cuda
# Each part is recorded even if an earlier one failed; exit status 1 if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-thor_check_$(hostname).json}")"
THOR_GBPS=273
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$ROOT"
py=python3

echo "[thor-check] 1/3 doctor"
$py -P -m capsule_ros.doctor --json --device cuda --params config/default.yaml > "$work/doctor.json" 2> "$work/doctor.err"
echo $? > "$work/doctor.rc"

echo "[thor-check] 2/3 capsule ops on cuda (default model, 1k/4k/16k)"
$py bench/capsule_ops.py --model config/models/default_qwen3_5.json --device cuda \
    --contexts 1024,4096,16384 --machine thor --out "$work/bench.json" > "$work/bench.log" 2>&1
echo $? > "$work/bench.rc"

echo "[thor-check] 3/3 bag replay through the node on cuda"
sed 's/^\(\s*device:\s*\)cpu/\1cuda/' config/default.yaml > "$work/params_cuda.yaml"
(cd "$work" && $py -P -m capsule_ros.demo --params-file "$work/params_cuda.yaml" \
    --bag "$ROOT/test/data/demo_bag" --out "$work/demo_out" --summary "$work/demo.json") \
    > "$work/demo.log" 2>&1
echo $? > "$work/demo.rc"

$py - "$work" "$OUT" "$THOR_GBPS" <<'PY'
import json, platform, sys
from pathlib import Path
work, out, gbps = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

def load(name):
    p = work / name
    try:
        return json.loads(p.read_text())
    except Exception as exc:  # the part failed before writing JSON: keep its log instead
        return {"error": f"{name}: {exc}"}

def tail(name, n=4000):
    p = work / name
    return p.read_text()[-n:] if p.exists() else ""

rc = {k: int((work / f"{k}.rc").read_text()) for k in ("doctor", "bench", "demo")}
bench = load("bench.json")
# The floor on Thor: a restore reads the capsule and writes the live buffers over one 273 GB/s bus.
for model in bench.get("models", bench.get("results", [])) if isinstance(bench, dict) else []:
    for row in model.get("rows", []):
        row["thor_floor_ms"] = round(2 * row["state_bytes"] / (gbps * 1e9) * 1e3, 4)
        row["restore_vs_thor_floor"] = round(row["restore_ms"] / row["thor_floor_ms"], 2)
        row["meets_1_5x_floor_plus_20us"] = row["restore_ms"] <= 1.5 * row["thor_floor_ms"] + 0.020
release = Path("/etc/nv_tegra_release")
doc = {
    "host": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
    "l4t": release.read_text().splitlines()[0] if release.exists() else None,
    "thor_bandwidth_gbps_spec": gbps, "exit_codes": rc,
    "doctor": load("doctor.json"), "doctor_stderr": tail("doctor.err"),
    "bench": bench, "bench_log": tail("bench.log"),
    "demo": load("demo.json"), "demo_log": tail("demo.log"),
}
out.write_text(json.dumps(doc, indent=1))
print(f"[thor-check] wrote {out}: doctor rc {rc['doctor']}, bench rc {rc['bench']}, demo rc {rc['demo']}")
sys.exit(1 if any(rc.values()) else 0)
PY
