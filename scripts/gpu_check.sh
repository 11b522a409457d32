#!/usr/bin/env bash
# The GPU check: one command, on a bare machine with one H100/H200 and PyTorch, transformers
# and Triton installed (pyzmq, msgspec, structlog, gguf... as wheels in .whl/ beside the
# checkout), under 10 minutes. Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.log.
#
#   bash scripts/gpu_check.sh                          # the real check (cuda, llama3-8b)
#   bash scripts/gpu_check.sh --device cpu --shape tiny --quick --out /tmp/rehearsal
#                                                      # the CPU rehearsal CI runs
#
# Steps, each under its own time limit (595 s in all) so one hang cannot eat the lease:
#   1. the tests marked gpu;
#   2. W1-lite (scripts/w1_lite.py): Conveyor 1 stage, then 2 stages sharing the device, then
#      transformers' continuous batching and static generate (batches of 64), same workload;
#   3. the decode step at batch 64 and 256, context 512, against its bandwidth floor
#      (scripts/decode_floor.py), SDPA and FlexAttention, and flex with CUDA graphs on and off;
#   4. `conveyor profile` on the device, written to deploy/profiles/.
# --quick shrinks every workload (8 requests of 16..64 tokens, 16 out; small grids).
set -uo pipefail

DEVICE=cuda SHAPE=llama3-8b OUT=gpu-check QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --shape) SHAPE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log" RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
# The carried wheels, only where Conveyor's own dependencies are missing (a bare GPU image).
if ! "$PY" -c "import zmq, msgspec, structlog, gguf, starlette, uvicorn" 2>/dev/null \
        && compgen -G ".whl/*.whl" > /dev/null; then
    echo "== installing the carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$QUICK" = 1 ]; then
    W1=(--requests 8 --min-input 16 --max-input 64 --output-tokens 16)
    FLOOR=(--batch 4,16 --context 64 --repeats 3 --copy-gib 0.25)
    PROFILE=(--prefill 0,16,64 --decode 0,1,4 --context 64,256 --head-rows 1,4 --repeats 2)
else
    W1=(--requests 128 --min-input 128 --max-input 1024 --output-tokens 256)
    FLOOR=(--batch 64,256 --context 512 --repeats 10)
    PROFILE=(--prefill 0,64,256,1024 --decode 0,16,64,256 --context 128,512,1536 --repeats 3)
fi
START=$(date +%s)

# step NAME SECONDS COMMAND...: runs it under its limit and records its exit status.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$RESULTS"
    [ $rc -eq 0 ] || echo "== $name FAILED (exit $rc)"
    return $rc
}

"$PY" - <<EOF >> "$RESULTS"
import json, platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
print(json.dumps({"case": "machine", "torch": torch.__version__, "gpu": gpu,
                  "cuda": torch.version.cuda, "python": platform.python_version(),
                  "device": "$DEVICE", "shape": "$SHAPE", "quick": $QUICK}))
EOF

step gpu-tests 120 "$PY" -m pytest -q -m gpu tests/unit/test_gpu_path.py \
    --junitxml "$OUT/gpu_tests.xml"
# Flex on the device only if its tests passed there, decode graphs only if theirs did (tests
# named *graph*); SDPA or eager steps otherwise: the run still measures.
ATTENTION=auto GRAPHS=auto
if [ "$DEVICE" = cuda ]; then
    read -r ATTENTION GRAPHS < <("$PY" - "$OUT/gpu_tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).iter("testcase"))
except (OSError, ET.ParseError):  # the step was killed before pytest wrote its report
    cases = []
failed = [c.get("name", "") for c in cases
          if c.find("failure") is not None or c.find("error") is not None]
flex_ok = bool(cases) and all("graph" in name for name in failed)
print("auto" if flex_ok else "sdpa", "auto" if flex_ok and not failed else "off")
EOF
)
    echo "== attention $ATTENTION, cuda graphs $GRAPHS"
fi
for stages in 1 2; do
    step "conveyor-${stages}stage" 110 "$PY" scripts/w1_lite.py --engine conveyor \
        --stages $stages --shape "$SHAPE" --device "$DEVICE" --attention $ATTENTION \
        --set model.cuda_graphs=$GRAPHS "${W1[@]}" --out "$RESULTS"
done
step hf-continuous 85 "$PY" scripts/w1_lite.py --engine hf-continuous --shape "$SHAPE" \
    --device "$DEVICE" "${W1[@]}" --out "$RESULTS"
step hf-static 55 "$PY" scripts/w1_lite.py --engine hf-static --batch 64 --shape "$SHAPE" \
    --device "$DEVICE" "${W1[@]}" --out "$RESULTS"
NO_GRAPHS=()
[ "$GRAPHS" = off ] && NO_GRAPHS=(--no-graphs)
step decode-floor 70 "$PY" scripts/decode_floor.py --shape "$SHAPE" --device "$DEVICE" \
    "${FLOOR[@]}" "${NO_GRAPHS[@]}" --out "$RESULTS"
PROFILE_OUT=deploy/profiles/$SHAPE-$DEVICE.json
[ "$QUICK" = 1 ] && PROFILE_OUT=$OUT/profile.json
step profile 45 "$PY" -m conveyor.cli profile --model "$SHAPE" --load-format dummy \
    --device "$DEVICE" --stages 1 --no-progress "${PROFILE[@]}" --out "$PROFILE_OUT"

"$PY" scripts/gpu_check_summary.py "$RESULTS" "$OUT/gpu_check.json" --profile "$PROFILE_OUT"
echo "== done in $(( $(date +%s) - START ))s: $OUT/gpu_check.json, $LOG"
