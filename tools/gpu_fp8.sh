#!/usr/bin/env bash
# The checks and measurements of shards that keep the release's FP8 / MXFP4 weights, for one GPU call of
# at most 10 minutes: each step has its own time limit (about 9.5 minutes in all), writes its log to OUT
# (default ./gpu_logs_fp8) and the script goes on after a failure. Prints a summary line per step; exit
# status 1 if any failed. Name steps to run a part.
#   bash tools/gpu_fp8.sh [OUT [STEP ...]]      steps: gpu_check_fp8 bench_weights rank_share
# gpu_check_fp8: kernel cases, FP8 vs BF16 shards on the fixtures (tools/gpu_check_fp8.py).
# bench_weights: 4 V4-Flash layers from BF16 vs FP8 weights, decode b1 / b32 at 1K (whole steps and per
#                layer without the head, against the bandwidth floor) and a 4K prefill (bench.py weights).
# rank_share:    all 43 V4-Flash layers at rank 0's share of N = 4 in FP8 on this GPU (bench.py rank-share).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_logs_fp8}}
shift $(( $# > 0 ? 1 : 0 ))
ONLY=" $* "
mkdir -p "$OUT"
status=0

step() {    # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.log"
    [ "$rc" -eq 0 ] || status=1
}

export PYTHONUNBUFFERED=1 USE_FLAGGEMS=0
step gpu_check_fp8 270 python -m tools.gpu_check_fp8
step bench_weights 200 python bench.py weights --layers 4 --batch 1 32 --context 1024 --prefill 4096
step rank_share 100 python bench.py rank-share --ranks 4 --weights fp8 --batch 1 32 --context 1024
exit $status
