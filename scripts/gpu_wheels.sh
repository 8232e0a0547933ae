#!/usr/bin/env bash
# Wheels the GPU machine needs and cannot download (it reaches no registry): run here, then
# `make gpu-test` there installs them from .whl/ into a temporary target.
#   transformers 5.24.0                the pinned version (the GPU image has 5.17)
#   flash-linear-attention/fla-core    Triton gated-delta-net kernels (transformers uses them)
#   mamba-ssm, Triton-only build       Mamba2 chunk scan + state update (Triton). Its Mamba1
#                                      CUDA extension has no binary wheel and is skipped
#                                      (MAMBA_SKIP_CUDA_BUILD); the package __init__, which
#                                      imports that extension, is reduced to the version string.
#   rosbags (+ apsw, backports.zstd,   read test/data/demo_bag in test/gpu (the pipeline replay
#   lz4, ruamel.yaml)                  test); the GPU image has none of them
# Building the mamba-ssm sdist's metadata imports torch and wheel: run this with a python3 that
# has both on its path (e.g. PATH=<venv with wheel>/bin:$PATH PYTHONPATH=<.venv site-packages>).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.whl"
mkdir -p "$out"
grep -qx "/.whl/" "$root/.git/info/exclude" 2>/dev/null || echo "/.whl/" >> "$root/.git/info/exclude"
plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
python3 -m pip download -q --no-deps --only-binary=:all: $plat -d "$out" \
  transformers==5.24.0 flash-linear-attention==0.6.0 fla-core==0.6.0
python3 -m pip download -q --no-deps --only-binary=:all: $plat -d "$out" \
  rosbags==0.11.9 apsw==3.54.1.0 backports.zstd==1.8.0 lz4==4.4.5 ruamel.yaml==0.19.1
if ! ls "$out"/mamba_ssm-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation -d "$tmp" mamba-ssm==2.3.2.post1
  tar xzf "$tmp"/mamba_ssm-*.tar.gz -C "$tmp"
  src=$(echo "$tmp"/mamba_ssm-*/)
  printf '__version__ = "2.3.2.post1"\n# Triton-only build for capsule_ros: no Mamba1 CUDA extension.\n' > "$src/mamba_ssm/__init__.py"
  # A plain py3 wheel of the package directory (no setup.py: it would try to build CUDA code).
  python3 - "$src" "$out" <<'PY'
import base64, hashlib, pathlib, sys, zipfile
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
name, ver = "mamba_ssm", "2.3.2.post1"
dist = f"{name}-{ver}.dist-info"
whl = out / f"{name}-{ver}-py3-none-any.whl"
records = []
with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
    def add(arc, data):
        z.writestr(arc, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{arc},sha256={digest},{len(data)}")
    for p in sorted((src / name).rglob("*.py")):
        add(str(p.relative_to(src)), p.read_bytes())
    add(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: mamba_ssm\nVersion: {ver}\n".encode())
    add(f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: capsule_ros\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{dist}/RECORD", "\n".join(records + [f"{dist}/RECORD,,"]) + "\n")
print(whl)
PY
  rm -rf "$tmp"
fi
ls -la "$out"
