#!/usr/bin/env bash
# The whole workflow on CPU with a tiny checkpoint of RANDOM WEIGHTS (its completions are noise):
# write it in the official release layout, convert it to 2 model-parallel shards, and generate
# from a prompt file with 2 ranks under torchrun. Everything goes into DEMO_DIR (default: demo/).
set -euo pipefail
cd "$(dirname "$0")"
DEMO_DIR="${DEMO_DIR:-demo}"
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

python random_release.py "$DEMO_DIR/release"
python convert.py --hf-ckpt-path "$DEMO_DIR/release" --save-path "$DEMO_DIR/mp2" --model-parallel 2
cat > "$DEMO_DIR/prompts.txt" <<'PROMPTS'
What is the capital of France?

Write a haiku about tensor parallelism.

Explain in one sentence what a KV cache is.
PROMPTS
USE_FLAGGEMS=0 torchrun --standalone --nproc-per-node 2 generate.py --ckpt-path "$DEMO_DIR/mp2" \
    --input-file "$DEMO_DIR/prompts.txt" --output-file "$DEMO_DIR/completions.jsonl" --max-new-tokens 24 "$@"
cat "$DEMO_DIR/completions.jsonl"
echo "(random weights: the completions above are noise; they are also in $DEMO_DIR/completions.jsonl)"
