#!/usr/bin/env bash
# One node, all its GPUs (or the ones in CUDA_VISIBLE_DEVICES): one process, a mesh over every
# local device. Usage: bash launch/single_node.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
CONFIG=${1:?usage: launch/single_node.sh CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: launch/single_node.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
# Let XLA take most of the GPU memory but leave room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m eercl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
