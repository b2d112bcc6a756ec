#!/usr/bin/env bash
# One whole GPU measurement in one call (for the lent H100, which has torch and transformers but
# no network): installs duplex-chat and the few pure-Python packages the CLI needs from wheels
# carried in .whl/ (see benchmarks/README.md), then runs `duplex-chat bench` and keeps the outputs.
#   bash benchmarks/gpu_bench.sh [extra bench flags...]
set -euo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site .
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m duplex_chat.cli.app bench --random-weights --json "$@" > "$OUT/bench.json" 2> "$OUT/bench.err" || echo "bench exit $?"
tail -5 "$OUT/bench.err"
if [ -n "${PROFILE:-}" ]; then python3 benchmarks/profile_steps.py > "$OUT/profile.txt" 2>&1 || tail -20 "$OUT/profile.txt"; fi
python3 - "$OUT/bench.json" <<'PY'
import json, sys
from rich.console import Console
from duplex_chat.cli.bench import render
render(Console(width=140), json.load(open(sys.argv[1])))
PY
