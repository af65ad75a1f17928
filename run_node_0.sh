#!/usr/bin/env bash
# generate.py over NNODES nodes (2 by default) of NPROC_PER_NODE ranks (8 by default), for a
# checkpoint converted with --model-parallel NNODES * NPROC_PER_NODE. Run this on node 0 and
# run_node_1.sh on node 1, with the same environment:
#   MASTER_ADDR  address of node 0 that the other nodes reach (required); MASTER_PORT (29500)
#   CKPT_PATH    the converted checkpoint, at the same path on every node (required)
#   CONFIG       model config (default CKPT_PATH/config.json); INPUT_FILE (prompt.txt)
# The o-groups layout (USE_OGROUPS_COMM) and FlagGems (USE_FLAGGEMS) are on by default: set them
# to 0 for world sizes up to o_groups, or on a CPU. Arguments are passed on to generate.py, and
# only those (generation settings keep generate.py's defaults).
set -euo pipefail

export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-eth0}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-1}"
export USE_FLAGGEMS="${USE_FLAGGEMS:-1}"
export USE_OGROUPS_COMM="${USE_OGROUPS_COMM:-1}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${CKPT_PATH:?set CKPT_PATH to the folder written by convert.py}"

exec python "$(dirname "$0")/generate.py" \
    --nnodes "${NNODES:-2}" \
    --nproc-per-node "${NPROC_PER_NODE:-8}" \
    --node-rank "${NODE_RANK:-0}" \
    --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" \
    --ckpt-path "$CKPT_PATH" \
    ${CONFIG:+--config "$CONFIG"} \
    --input-file "${INPUT_FILE:-prompt.txt}" \
    "$@"
