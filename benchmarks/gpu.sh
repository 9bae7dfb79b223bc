#!/usr/bin/env bash
# GPU benchmark in one go, for a bare single-GPU Linux machine holding this repository:
# installs deepscan in its own venv, checks that torch and onnxruntime see the GPU, then runs
# `deepscan bench --throughput` on CUDA and writes its JSON (default benchmarks/gpu-result.json),
# then the compiled spatial-temporal model's clips/s (benchmarks/gpu-result-compile.json).
# Budget: install ~2-4 min (pip), benchmark ~3 min on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-result.json}
venv=${DEEPSCAN_GPU_VENV:-.venv-gpu}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e '.[test]'
"$venv/bin/python" - <<'PY'
import torch, onnxruntime
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
PY
start=$(date +%s)
timeout 420 "$venv/bin/deepscan" bench --throughput --json --device cuda --batch-size "${BATCH:-256}" > "$out"
echo "wrote $out in $(( $(date +%s) - start )) s" >&2
# torch.compile on the GPU, separately so that a slow or failing compile cannot cost the above.
timeout 180 "$venv/bin/python" -c "import json, torch; from deepscan.perf import model_throughput as m; \
print(json.dumps(m('spatial-temporal', 'auto', torch.device('cuda'), ${BATCH:-256}, iters=10, use_compile=True)))" \
  > "${out%.json}-compile.json" || echo "torch.compile run failed or timed out" >&2
