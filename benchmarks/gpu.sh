#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU machine (e.g. the device tool's H200).
# Installs the carried wheels the machine's image lacks (see docs/benchmarks.md for how
# to fetch them into .whl/), then measures training and embedding throughput and peak
# memory of the real pipeline code. Extra arguments go to benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 benchmarks/gpu_bench.py --out "$out/gpu.json" "$@"
