"""One benchmark command: what a run's stages cost on the devices and the host at hand (the
sections: eercl_jax/benchmarks.py; the settings: configs/bench.py).

  python -m eercl_jax.bench                                   # CPU-sized, a few minutes
  python -m eercl_jax.bench --config.bench.sections=step,knn  # some sections
  python -m eercl_jax.bench --config=configs/bench.py:vit_b16_224
  python -m eercl_jax.bench --config=configs/bench.py:configs/adapt_expw.py \
      --config.adapt.batch_size=128                           # a training config's stage
  bash benchmarks/gpu_check.sh                                # one GPU, within 8 minutes
  python -m eercl_jax.bench --config=configs/bench.py:configs/source.py \
      --config.bench.sections=step --config.bench.compile_only=True  # memory + FLOPs, no run
  python -m eercl_jax.bench --config=configs/bench.py:configs/source.py \
      --config.bench.sections=step \
      --config.bench.compile_for=benchmarks/gpu_targets/h100_sxm.txtpb  # for a GPU, without one

Prints one JSON line per figure on stdout ({"name", "value", "unit", ...settings}; a figure
that cannot be measured here: {"name", "skipped": reason}). Log lines go to stderr.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from eercl_jax.tools import cli

BENCH_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "bench.py")
SECTIONS = ("step", "refresh", "pipeline", "views", "knn", "smoke")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from eercl_jax import benchmarks  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  unknown = sorted(set(benchmarks.names(config.bench.sections)) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f"config.bench.sections: unknown {unknown}; expected {SECTIONS}")
  dev = benchmarks.device_settings()
  logging.info("bench on %d %s device(s) (%s); sections %s", dev["devices"], dev["device"],
               dev["platform"], config.bench.sections)
  tmp = tempfile.mkdtemp(prefix="eercl_bench_")
  try:
    for fig in benchmarks.run(config, tmp):
      print(json.dumps(fig), flush=True)
  finally:
    with contextlib.suppress(OSError):
      shutil.rmtree(tmp)


def run() -> None:
  config = config_flags.DEFINE_config_file(
      "config", f"{BENCH_CONFIG}:cpu", "configs/bench.py[:PRESET] (cpu, vit_b16_224, "
      "gpu_check) or configs/bench.py:<a training config file>.", lock_config=True)
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config))


if __name__ == "__main__":
  run()
