#!/usr/bin/env bash
# K local CPU processes on one machine (JAX CPU collectives over localhost), to try the
# multi-process code path on a laptop. Each process gets D fake CPU devices.
#   bash launch/local_cpu_processes.sh 2 configs/demo_source.py runs/mp_demo
# Process 0 writes logs and checkpoints; every process logs to WORKDIR/logs/process_<i>.out.
set -euo pipefail
K=${1:?usage: launch/local_cpu_processes.sh K CONFIG WORKDIR [--config.x=y ...]}
CONFIG=${2:?}; WORKDIR=${3:?}
shift 3
D=${DEVICES_PER_PROCESS:-1}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$WORKDIR/logs"
pids=()
for ((i = 0; i < K; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
  JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$K" JAX_PROCESS_ID="$i" \
    python -m eercl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    > "$WORKDIR/logs/process_$i.out" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 "$WORKDIR/logs/process_0.out"
exit $status
