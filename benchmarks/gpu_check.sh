#!/usr/bin/env bash
# One GPU check, ready to run on a CUDA machine (about 8 minutes in all):
#   (a) loop / vmap / ghost agreement on tiny Llama, GPT-2, BERT and SmolLM2, float32 and bfloat16,
#       packed and unpacked (benchmarks/gpu_agreement.py);
#   (b) bench_engines.py and bench_train.py at sizes that finish in a few minutes;
#   (c) one JSON with all of it: ${OUT:-results/gpu-check}/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, with gradscope installed
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-results/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check is for a GPU machine')" || exit 2
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   FAILED (see $OUT/$name.log)"; status=1
  fi
  tail -n 3 "$OUT/$name.log"
}

step agreement 180 "$PY" benchmarks/gpu_agreement.py --device cuda --json "$OUT/agreement.json"
step bench_engines 150 "$PY" benchmarks/bench_engines.py --device cuda --cases tiny-llama smollm2 wide --rounds 3 \
  --json "$OUT/bench_engines.json"
step bench_train 150 "$PY" benchmarks/bench_train.py --device cuda --cases smollm2 wide --rounds 3 \
  --json "$OUT/bench_train.json"

"$PY" - "$OUT" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

out = Path(sys.argv[1])
parts = {}
for name in ("agreement", "bench_engines", "bench_train"):
    f = out / f"{name}.json"
    parts[name] = json.loads(f.read_text()) if f.exists() else None
summary = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           **parts}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF
exit $status
