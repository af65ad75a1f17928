#!/usr/bin/env bash
# The whole workflow on CPU with a tiny checkpoint of RANDOM WEIGHTS (its completions are noise):
# write it in the official release layout, convert it to 2 model-parallel shards, and generate
# from a prompt file with 2 ranks. Everything goes into DEMO_DIR (default: demo/), which must be
# a new folder or one that an earlier demo.sh made: that one is replaced, anything else is refused.
set -euo pipefail
cd "$(dirname "$0")"
DEMO_DIR="${DEMO_DIR:-demo}"
MARK=".made-by-demo.sh"

if [ -e "$DEMO_DIR" ]; then
    if [ ! -e "$DEMO_DIR/$MARK" ] && [ -n "$(ls -A "$DEMO_DIR" 2>/dev/null || echo not-a-folder)" ]; then
        echo "demo.sh: $DEMO_DIR exists and was not made by demo.sh: set DEMO_DIR to a new folder" >&2
        exit 1
    fi
    echo "demo.sh: replacing the earlier demo in $DEMO_DIR"
    rm -rf "$DEMO_DIR"
fi
mkdir -p "$DEMO_DIR"
touch "$DEMO_DIR/$MARK"

python random_release.py "$DEMO_DIR/release"
python convert.py --hf-ckpt-path "$DEMO_DIR/release" --save-path "$DEMO_DIR/mp2" --model-parallel 2
cat > "$DEMO_DIR/prompts.txt" <<'PROMPTS'
What is the capital of France?

Write a haiku about tensor parallelism.

Explain in one sentence what a KV cache is.
PROMPTS
USE_FLAGGEMS=0 python generate.py --nproc-per-node 2 --ckpt-path "$DEMO_DIR/mp2" \
    --input-file "$DEMO_DIR/prompts.txt" --output-file "$DEMO_DIR/completions.jsonl" --max-new-tokens 24 "$@"
cat "$DEMO_DIR/completions.jsonl"
echo "(random weights: the completions above are noise; they are also in $DEMO_DIR/completions.jsonl)"
