#!/usr/bin/env bash
# The node-1 half of run_node_0.sh: same environment and arguments (see there).
NODE_RANK=1 exec "$(dirname "$0")/run_node_0.sh" "$@"
