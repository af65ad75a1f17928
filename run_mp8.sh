#!/usr/bin/env bash
# generate.py on one node: NPROC_PER_NODE ranks (8 by default) over a checkpoint converted with
# --model-parallel of the same size. Settings come from the environment; arguments are passed on
# to generate.py after the ones below, so they win, and only what you give is passed (generation
# settings keep generate.py's defaults):
#   CKPT_PATH=/data/v4-flash-mp8 INPUT_FILE=prompts.txt ./run_mp8.sh --output-file out.jsonl
# CONFIG defaults to CKPT_PATH/config.json; MASTER_PORT to any free port. USE_FLAGGEMS is on by
# default (GPU); set it to 0 on a CPU. generate.py starts the ranks itself (torchrun's launcher,
# in-process), so a failure ends in one line.
set -euo pipefail

export USE_FLAGGEMS="${USE_FLAGGEMS:-1}"
: "${CKPT_PATH:?set CKPT_PATH to the folder written by convert.py}"

exec python "$(dirname "$0")/generate.py" \
    --nproc-per-node "${NPROC_PER_NODE:-8}" \
    ${MASTER_PORT:+--master-port "$MASTER_PORT"} \
    --ckpt-path "$CKPT_PATH" \
    ${CONFIG:+--config "$CONFIG"} \
    --input-file "${INPUT_FILE:-prompt.txt}" \
    "$@"
