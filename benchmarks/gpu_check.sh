#!/usr/bin/env bash
# One-GPU check of the real job's speed, within 8 minutes (not run on a GPU yet):
#   bash benchmarks/gpu_check.sh                 # on a machine with one GPU
# prints JSON lines (python -m eercl_jax.bench --preset=gpu_check): ViT-B/16 at 224 in bfloat16
# source and adaptation step images/s and MFU, bank refresh images/s, input pipeline images/s
# with all cores (folder data, and packed data when eercl_jax.data.pack is there), bank kNN,
# and a 10-step source + adaptation smoke run of ViT-B/16 at 224 on synthetic data.
# Extra arguments go to the bench, e.g. --peak_tflops=790 (an H200's measured matmul peak).
# CPU-sized dry run of the same sections (minutes on a laptop):
#   bash benchmarks/gpu_check.sh --config.model.size=mu/8 --config.model.dtype=float32 \
#     --config.data.resize=36 --config.data.crop=32 --config.batch_size=64 \
#     --config.adapt.refresh_batch_size=128 --bank_rows=10000 --refresh_images=256 \
#     --pipeline_images=128 --knn_sizes=10000 --smoke_steps=2
set -euo pipefail
cd "$(dirname "$0")/.."
# Compiled programs are cached across the bench's sections and across reruns.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/eercl_jax_xla_cache}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true
exec timeout 480 python -m eercl_jax.bench --preset=gpu_check "$@"
