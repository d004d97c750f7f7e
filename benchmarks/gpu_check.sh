#!/usr/bin/env bash
# One-GPU check of the real job's speed, within 8 minutes (not run on a GPU yet):
#   bash benchmarks/gpu_check.sh                 # on a machine with one GPU
# prints JSON lines (python -m eercl_jax.bench --config=configs/bench.py:gpu_check): ViT-B/16 at
# 224 in bfloat16 source and adaptation step images/s, MFU and device memory, bank refresh
# images/s, input pipeline images/s with all cores (folder and packed data), bank kNN, and a
# 10-step source + adaptation smoke run of ViT-B/16 at 224 on synthetic data.
# Extra arguments go to the bench, e.g. --config.bench.peak_tflops=790 (an H200's measured
# matmul peak). The CPU-sized dry run of the same sections (about a minute; the test suite runs
# it, tests/test_bench.py):
#   BENCH_CONFIG=configs/bench.py:gpu_check,runlocal bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Compiled programs are cached across the bench's sections and across reruns.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/eercl_jax_xla_cache}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true
exec timeout 480 python -m eercl_jax.bench --config="${BENCH_CONFIG:-configs/bench.py:gpu_check}" "$@"
