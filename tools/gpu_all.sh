#!/usr/bin/env bash
# Every single-GPU check and measurement of this repository in one go, for a GPU machine lent for
# a few minutes: each step has its own time limit, writes its log to OUT (default ./gpu_logs) and
# the script goes on after a failure. Prints a summary line per step; exit status 1 if any failed.
# The limits add up to about 60 minutes: name steps to run a part (a device call is at most 10).
#   bash tools/gpu_all.sh [OUT [STEP ...]]      steps: gpu_check bench bench_r1 backends bf16_drift flaggems_ops
#                                                      flaggems_real flaggems_check gpu_check_fp8 bench_weights
#                                                      rank_share bench_flaggems
# gpu_check: the V4 and R1 fixtures (python -m tools.gpu_check --fixtures R1 runs R1's part alone).
# bench_r1: DeepSeek-R1's real shapes, 1 dense + 2 MoE layers (about 70 GB at its peak), against
# transformers' DeepseekV3ForCausalLM, with issue 16's targets at the end.
# gpu_check_fp8: FP8/MXFP4 kernel cases natively, FP8 vs BF16 shards on the fixtures.
# bench_weights: 4 V4-Flash layers from BF16 vs FP8 weights side by side (decode per layer, 4K prefill).
# rank_share: all 43 V4-Flash layers at rank 0's share of N = 4 in FP8 on this GPU, collectives excluded.
# backends: torch vs triton vs flaggems on 4 V4-Flash layers (speed and logit agreement, OUT/backends.json).
# FlagGems steps need flag-gems importable (see README); without it they report their failure.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_logs}}
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

step gpu_check 300 python -m tools.gpu_check
step bench 240 python bench.py speed --compare hf --profile --batch 1 8 32 128 --context 1024 65536
step bench_r1 300 python bench.py speed --config configs/config_r1.json --compare hf
step backends 240 python bench.py backends --layers 4 --report "$OUT/backends.json"
step bf16_drift 150 python -m tools.bf16_drift
step flaggems_ops 580 python -m tools.flaggems_ops --timeout-per-function 40 --timeout-all 150 --out "$OUT/flaggems_ops.json"
step flaggems_real 580 python -m tools.flaggems_ops --shapes real --bisect --exclude mm,mul,topk,cat,stack,sum_dim --timeout-all 120 --out "$OUT/flaggems_real.json"
step flaggems_check 280 python -m tools.flaggems_check
step gpu_check_fp8 270 python -m tools.gpu_check_fp8
step bench_weights 200 python bench.py weights --layers 4 --batch 1 32 --context 1024 --prefill 4096
step rank_share 100 python bench.py rank-share --ranks 4 --weights fp8 --batch 1 32 --context 1024
step bench_flaggems 240 env FLAGGEMS_EXCLUDE= python bench.py speed --backend flaggems --batch 1 32 --context 1024 --prefill 1024
exit $status
