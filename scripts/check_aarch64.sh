#!/usr/bin/env bash
# make check-aarch64: does the robot's pin set (requirements-thor.txt) resolve to binary wheels
# for a Jetson Thor (Ubuntu 24.04: glibc 2.39, aarch64, CPython 3.12)? Needs the registry, so it is
# not part of `make test`. torch is not in the file (it comes from PyTorch's cu130 index) and the
# ROS packages come from apt. Every wheel pip pulls in must be pinned in the file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
# Older pip does not widen a manylinux tag to older glibc levels: name every level the robot takes.
plat=""
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_17 manylinux2014; do
  plat="$plat --platform ${p}_aarch64"
done
echo "[check-aarch64] pip download --platform manylinux_2_28_aarch64 (and older/newer glibc tags up to 2.39)" \
     "--python-version 3.12 --only-binary=:all: -r requirements-thor.txt -c requirements-thor.txt"
"$py" -m pip download -q $plat --python-version 3.12 --implementation cp --only-binary=:all: \
  -d "$dl" -r "$root/requirements-thor.txt" -c "$root/requirements-thor.txt"
"$py" - "$dl" "$root/requirements-thor.txt" <<'PY'
import re, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for line in Path(sys.argv[2]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, _, ver = line.partition("==")
        pins[norm(name)] = ver
got = {}
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ver = whl.name.split("-")[:2]
    got[norm(name)] = (ver, whl.name)
for name, (ver, fname) in sorted(got.items()):
    print(f"  {name:<28} {ver:<14} {fname.split('-', 2)[2]}")
unpinned = sorted(set(got) - set(pins))
unused = sorted(set(pins) - set(got))
if unpinned:
    sys.exit(f"[check-aarch64] FAIL: pulled in but not pinned in requirements-thor.txt: {unpinned}")
if unused:
    sys.exit(f"[check-aarch64] FAIL: pinned but not resolved: {unused}")
print(f"[check-aarch64] ok: all {len(got)} pins resolve to aarch64/cp312 (or pure) wheels; "
      "torch excluded (PyTorch cu130 index), ROS from apt")
PY
