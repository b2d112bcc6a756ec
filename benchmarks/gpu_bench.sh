#!/usr/bin/env bash
# One whole GPU measurement in one call (for the lent GPU machine, which has torch, transformers,
# typer and rich but no network): installs duplex-chat without its dependencies (plus any wheels
# carried in .whl/), then runs `duplex-chat bench` and keeps the outputs in $OUT.
#   bash benchmarks/gpu_bench.sh [extra bench flags...]
#   MICRO="base tuned" bash benchmarks/gpu_bench.sh ...   # step micro-benchmarks first
#   TESTS=1 ...                                            # the GPU tests, in the background
#   TALKER_MICRO="tuned product" ...                       # talker micro-benchmark (beside TESTS)
#   VERIFY32=1 BENCH=0 ...                                 # bench --verify's float32 check alone
#   PROFILE=1 ...                                          # benchmarks/profile_steps.py
#   BENCH=0 ...                                            # skip the bench itself
set -euo pipefail
export OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site .
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# The GPU tests run in the background: beside the talker micro-benchmark's compilation (it times
# after them), the profile's and the bench's compilation (longer than the tests), the float32
# check; the step micro-benchmark waits for them. Their result is printed at the end.
done_file=$(mktemp -u)
wait_for_tests() {  # the tests' own timeout ends them; this only guards against a stuck job
    local waited=0
    while [ ! -e "$done_file" ] && [ $waited -lt 900 ]; do sleep 1; waited=$((waited + 1)); done
}
# keeps the script's exit status (the bench's 3 for a missed target, say) whatever grep finds
trap 'rc=$?; wait; [ -z "${TESTS:-}" ] || grep -v DEBUG "$OUT/tests.txt" | tail -25 || true; exit $rc' EXIT
if [ -n "${TESTS:-}" ]; then
    (timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS_FILES:-tests/} \
        > "$OUT/tests.txt" 2>&1 || echo "tests exit $?" >> "$OUT/tests.txt"; touch "$done_file") &
else
    touch "$done_file"
fi
if [ -n "${TALKER_MICRO:-}" ]; then
    # shellcheck disable=SC2086
    MICRO_WAIT_FOR=$done_file timeout "${TALKER_MICRO_TIMEOUT:-540}" python3 benchmarks/talker_micro.py \
        $TALKER_MICRO 2>&1 | tee "$OUT/talker-micro.txt" || echo "talker micro exit $?"
fi
if [ -n "${MICRO:-}" ]; then
    wait_for_tests  # its timings need the GPU to itself
    # shellcheck disable=SC2086
    timeout "${MICRO_TIMEOUT:-300}" python3 benchmarks/step_micro.py $MICRO 2>&1 | tee "$OUT/micro.txt" || echo "micro exit $?"
fi
if [ -n "${VERIFY32:-}" ]; then  # bench --verify's float32 check alone (no engine measurement)
    timeout "${VERIFY32_TIMEOUT:-400}" python3 -c "
import json
from duplex_chat.config import load_settings
from duplex_chat.model import bench
print(json.dumps(bench.verify_float32(bench.verify_settings(load_settings()))))" \
        > "$OUT/verify32.json" 2> "$OUT/verify32.err" || { echo "verify32 exit $?"; tail -20 "$OUT/verify32.err"; }
    cat "$OUT/verify32.json"
fi
if [ -n "${PROFILE:-}" ]; then  # compiles beside the tests, times after them
    MICRO_WAIT_FOR=$done_file timeout "${PROFILE_TIMEOUT:-540}" python3 benchmarks/profile_steps.py \
        > "$OUT/profile.txt" 2>&1 || { echo "profile exit $?"; tail -20 "$OUT/profile.txt"; }
    grep -E "^(GPU over|host CUDA|a reply unprofiled|engine's talker|talker alone)" "$OUT/profile.txt" || true
fi
[ "${BENCH:-1}" = 1 ] || exit 0
# The GPU memory each process holds as nvidia-smi shows it (allocator cache and CUDA context
# included), sampled every 250 ms through the bench; the largest process's maximum (the bench's,
# whatever else runs beside it) is printed at the end.
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 250 \
    > "$OUT/smi.txt" &
smi=$!
status=0
timeout "${BENCH_TIMEOUT:-540}" python3 -m duplex_chat.cli.app bench --random-weights --json "$@" \
    > "$OUT/bench.json" 2> "$OUT/bench.err" || status=$?
echo "bench exit $status"
kill $smi 2>/dev/null || true
echo "nvidia-smi peak: $(awk -F', ' '$2 > m {m = $2} END {print m}' "$OUT/smi.txt") MiB (used_memory of the largest process)"
tail -5 "$OUT/bench.err"
[ -s "$OUT/bench.json" ] || exit 1
python3 - "$OUT/bench.json" <<'PY'
import json, sys
from rich.console import Console
from duplex_chat.cli.bench import render
render(Console(width=140), json.load(open(sys.argv[1])))
PY
