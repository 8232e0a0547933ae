#!/usr/bin/env bash
# make gpu-test: on a CUDA machine with torch (no ROS needed). Installs the wheels carried in
# .whl/ (scripts/gpu_wheels.sh makes them) into a temporary target, then runs the ROS-free GPU
# tests against this checkout's sources. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-test: no CUDA device here')"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
  echo "[gpu-test] installing $(ls "$root"/.whl/*.whl | wc -l) carried wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root"/.whl/*.whl
else
  echo "[gpu-test] no .whl/ here: using the machine's own transformers (run scripts/gpu_wheels.sh)"
fi
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$py" -c "import transformers, torch; print('[gpu-test] torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
cd "$root"
exec "$py" -m pytest -rs -p no:cacheprovider --import-mode=importlib -o pythonpath=test \
  --timeout=600 test/gpu "$@"
