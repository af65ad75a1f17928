#!/usr/bin/env bash
# Tensor parallelism over NCCL on a machine with 2 GPUs (not run by pytest):
#   bash tools/multi_gpu_check.sh OUT_DIR
# 1. generate.py greedy on a fixture checkpoint: N = 1 vs N = 2 over NCCL, the two-node launch
#    simulated by run_node_0.sh / run_node_1.sh (one GPU each, 127.0.0.1), and the o-groups layout
#    (a fixture with o_groups 1, USE_OGROUPS_COMM=1): every completion identical to N = 1. The same
#    N = 1 vs N = 2 on the R1 fixture (testkit/release_v3: DeepSeek-R1's format, model_v3.py). Where
#    humming-kernels is installed, N = 1 vs N = 2 with USE_HUMMING=1 and USE_HUMMING=fp8 (FP8 shards
#    of a V4 fixture 128 wide, each rank's experts on humming). humming runs in bf16 only, where N = 2
#    sums in another order than N = 1 and this random fixture amplifies the roundings that flips, so
#    these completions may part after some tokens: checked is the first token of each (it parts only
#    if the prefill's two best logits nearly tie; an expert on the wrong rank changes it), and where
#    the rest parts is printed.
# 2. tools/all_reduce_check.py: the small all-reduces' one-shot kernel (torch's symmetric memory) gives
#    NCCL's sums bit for bit, eager and graphed, the same on both ranks; both timed.
# 3. bench.py speed at N = 1 and N = 2 (real V4-Flash layer shapes), collectives per decode step.
# Exits non-zero when a run fails or outputs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?output folder}"
WORK="$(mktemp -d)"
export USE_FLAGGEMS=0 PYTHONUNBUFFERED=1 NCCL_SOCKET_IFNAME=lo
status=0

python random_release.py "$WORK/release" >/dev/null
python -c "
from random_release import hf_config, write_release
write_release('$WORK/release_g1', config=hf_config(o_groups=1), seed=1)"
python convert.py --hf-ckpt-path "$WORK/release" --save-path "$WORK/ckpt" --model-parallel 1
python convert.py --hf-ckpt-path "$WORK/release" --save-path "$WORK/ckpt" --model-parallel 2
python convert.py --hf-ckpt-path "$WORK/release_g1" --save-path "$WORK/ckpt_g1" --model-parallel 1
USE_OGROUPS_COMM=1 python convert.py --hf-ckpt-path "$WORK/release_g1" --save-path "$WORK/ckpt_g1" --model-parallel 2
printf 'Hello there\n\nWhy is the sky blue? Answer in one sentence.\n\nList three prime numbers.\n\nWrite a long story about a GPU.\n\nHi\n' > "$WORK/prompts.txt"
GEN=(--input-file "$WORK/prompts.txt" --temperature 0 --max-new-tokens 32 --max-batch-size 4 --dtype fp32)

same() {  # name, reference jsonl, candidate jsonl
    if cmp -s "$2" "$3"; then echo "$1: identical to N = 1"; else echo "$1: DIFFERENT from N = 1"; status=1; fi
}
python generate.py --ckpt-path "$WORK/ckpt" "${GEN[@]}" --output-file "$OUT/gen_mp1.jsonl"
torchrun --standalone --nproc-per-node 2 generate.py --ckpt-path "$WORK/ckpt" "${GEN[@]}" --output-file "$OUT/gen_mp2.jsonl"
same "N = 2 over NCCL" "$OUT/gen_mp1.jsonl" "$OUT/gen_mp2.jsonl"
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 NNODES=2 NPROC_PER_NODE=1 CKPT_PATH="$WORK/ckpt" USE_OGROUPS_COMM=0
CUDA_VISIBLE_DEVICES=0 ./run_node_0.sh "${GEN[@]}" --output-file "$OUT/gen_2nodes.jsonl" &
CUDA_VISIBLE_DEVICES=1 ./run_node_1.sh "${GEN[@]}" --output-file "$WORK/unused.jsonl"
wait $!
same "two nodes (run_node_0.sh + run_node_1.sh)" "$OUT/gen_mp1.jsonl" "$OUT/gen_2nodes.jsonl"
unset MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE CKPT_PATH USE_OGROUPS_COMM
python generate.py --ckpt-path "$WORK/ckpt_g1" "${GEN[@]}" --output-file "$OUT/gen_g1_mp1.jsonl"
USE_OGROUPS_COMM=1 torchrun --standalone --nproc-per-node 2 generate.py --ckpt-path "$WORK/ckpt_g1" "${GEN[@]}" \
    --output-file "$OUT/gen_g1_mp2.jsonl"
same "o-groups layout (o_groups 1, N = 2)" "$OUT/gen_g1_mp1.jsonl" "$OUT/gen_g1_mp2.jsonl"
python -c "
from testkit.release_v3 import write_release_v3
write_release_v3('$WORK/release_r1', seed=0)"
python convert.py --hf-ckpt-path "$WORK/release_r1" --save-path "$WORK/ckpt_r1" --model-parallel 1
python convert.py --hf-ckpt-path "$WORK/release_r1" --save-path "$WORK/ckpt_r1" --model-parallel 2
python generate.py --ckpt-path "$WORK/ckpt_r1" "${GEN[@]}" --output-file "$OUT/gen_r1_mp1.jsonl"
torchrun --standalone --nproc-per-node 2 generate.py --ckpt-path "$WORK/ckpt_r1" "${GEN[@]}" \
    --output-file "$OUT/gen_r1_mp2.jsonl"
same "R1 fixture, N = 2 over NCCL" "$OUT/gen_r1_mp1.jsonl" "$OUT/gen_r1_mp2.jsonl"
if python -c "import humming" 2>/dev/null; then
    python -c "
from testkit.fp8 import write_v4
write_v4('$WORK/release_wide', hidden_size=128)"
    for n in 1 2; do
        python convert.py --hf-ckpt-path "$WORK/release_wide" --save-path "$WORK/ckpt_wide" --model-parallel $n --dtype fp8
    done
    for mode in 1 fp8; do
        HUMMING=(--ckpt-path "$WORK/ckpt_wide" --input-file "$WORK/prompts.txt" --temperature 0 --max-new-tokens 32
                 --max-batch-size 4 --dtype bf16)
        USE_HUMMING=$mode python generate.py "${HUMMING[@]}" --output-file "$OUT/gen_humming_${mode}_mp1.jsonl"
        USE_HUMMING=$mode torchrun --standalone --nproc-per-node 2 generate.py "${HUMMING[@]}" \
            --output-file "$OUT/gen_humming_${mode}_mp2.jsonl"
        python - "$OUT/gen_humming_${mode}_mp1.jsonl" "$OUT/gen_humming_${mode}_mp2.jsonl" "USE_HUMMING=$mode" <<'PY' \
            || status=1
import json, sys
one, two = ([json.loads(line) for line in open(path)] for path in sys.argv[1:3])
parts = [next((i for i, (a, b) in enumerate(zip(x["completion_ids"], y["completion_ids"])) if a != b), None)
         for x, y in zip(one, two)]
ok = len(one) == len(two) and all(p != 0 for p in parts)
print(f"{sys.argv[3]} (bf16, FP8 shards), N = 2 over NCCL: first tokens {'equal' if ok else 'DIFFERENT'} to N = 1's; "
      f"completions part at token {parts} (None: identical)")
sys.exit(0 if ok else 1)
PY
    done
else
    echo "USE_HUMMING at N = 2: not run, humming-kernels is not installed"
fi

torchrun --standalone --nproc-per-node 2 -m tools.all_reduce_check 2>&1 | tee "$OUT/all_reduce.log" || status=1
python bench.py speed --batch 1 32 --context 1024 16384 --prefill 4096 2>&1 | tee "$OUT/bench_mp1.log"
torchrun --standalone --nproc-per-node 2 bench.py speed --batch 1 32 --context 1024 16384 --prefill 4096 2>&1 \
    | tee "$OUT/bench_mp2.log"
rm -rf "$WORK"
echo "MULTI-GPU CHECK $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
