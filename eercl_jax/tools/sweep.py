"""Runs a paper table as one grid: sources x targets x methods x variants x seeds, then the
summary tables (the library: eercl_jax/grid.py, whose docstring describes the grid and its run
names).

    python -m eercl_jax.sweep --root=runs/paper --sources=configs/source_raf.py \
        --targets=configs/adapt_ck.py,configs/adapt_jaffe.py --seeds=1,2,3 --mode=slurm \
        [--methods=tent,shot,eercl] [--variants='no_nce:adapt.instance_nce_weight=0']

A user mistake (a missing config, a run recorded with another command) is one line `error: ...`
and exit status 2.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app, flags

from eercl_jax import constants, grid
from eercl_jax.errors import UserError
from eercl_jax.tools import cli

_ROOT = flags.DEFINE_string("root", None, "Folder of the sweep's runs, logs and summary.")
_SOURCES = flags.DEFINE_list("sources", None, "Source configs, each PATH or NAME=PATH "
                             "(NAME defaults to the file name without 'source_').")
_TARGETS = flags.DEFINE_list("targets", [], "Adaptation configs, each PATH or NAME=PATH "
                             "(NAME defaults to the file name without 'adapt_').")
_METHODS = flags.DEFINE_list(
    "methods", [], "Adaptation methods, each a row of the table: every adaptation run once per "
    "method with --config.method=<name>, named <src>2<tgt>_<method>_seed<k> (default: the "
    "adaptation configs' own method, named <src>2<tgt>_seed<k>).")
_VARIANTS = flags.DEFINE_string(
    "variants", "", "Ablations, each a row of its own beside its method: 'NAME:KEY=VALUE[,KEY="
    "VALUE...][;NAME:...]' runs every adaptation again with --config.KEY=VALUE, named "
    "<src>2<tgt>_<method>-<NAME>_seed<k>, e.g. 'no_nce:adapt.instance_nce_weight=0'.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds; adaptation seed k starts from "
                           "source seed k.")
_MODE = flags.DEFINE_enum("mode", "local", ["local", "slurm"], "Where the runs go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command and dependency; run nothing.")
_SOURCE_ARGS = flags.DEFINE_string("source_args", "", "Extra arguments for every source run, e.g. "
                                   "'--config.num_steps=500'.")
_ADAPT_ARGS = flags.DEFINE_string("adapt_args", "", "Extra arguments for every adaptation run.")
_GPUS_PER_RUN = flags.DEFINE_integer("gpus_per_run", 1, "GPUs per run.")
_DEVICES = flags.DEFINE_string(
    "devices", None, "local mode: GPU ids to use, e.g. '0,1,2,3' (default: $CUDA_VISIBLE_DEVICES, "
    "else every GPU nvidia-smi lists); 'cpu:N' runs N runs at a time on the CPU.")
_SBATCH_ARGS = flags.DEFINE_string("sbatch_args", "", "slurm mode: extra sbatch arguments for "
                                   "every array, e.g. '--partition=gpu --time=12:00:00'.")
_SUMMARY_SBATCH_ARGS = flags.DEFINE_string(
    "summary_sbatch_args", grid.SUMMARY_SBATCH_ARGS, "slurm mode: the summary job's sbatch "
    "arguments (it does not get --sbatch_args: it needs no GPU and little time).")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 0, "slurm mode: at most this many tasks of "
                                     "an array at once (0 = no limit).")
_PYTHON = flags.DEFINE_string("python", sys.executable, "Python interpreter of the runs.")


# -------------------------------------------------------------------------------------- main


@cli.command
def main(argv) -> int:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not _ROOT.value:
    raise UserError("--root is required")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise UserError(f"--seeds: integers expected, got {_SEEDS.value}") from None
  the_grid = grid.build_grid(_ROOT.value, _SOURCES.value or [], _TARGETS.value, seeds,
                             _PYTHON.value, _SOURCE_ARGS.value, _ADAPT_ARGS.value,
                             methods=_METHODS.value, variants=_VARIANTS.value)
  if _MODE.value == "slurm":
    grid.submit_slurm(the_grid, dry_run=_DRY_RUN.value, gpus_per_run=_GPUS_PER_RUN.value,
                      sbatch_args=_SBATCH_ARGS.value, max_parallel=_MAX_PARALLEL.value,
                      python=_PYTHON.value, summary_sbatch_args=_SUMMARY_SBATCH_ARGS.value)
    return 0
  slots = grid.device_slots(_DEVICES.value, _GPUS_PER_RUN.value)
  runs = the_grid.runs()
  status = grid.run_local(the_grid.root, runs, slots, dry_run=_DRY_RUN.value)
  for summary in grid.summary_argvs(the_grid.root, [r.workdir for r in runs], _PYTHON.value):
    if _DRY_RUN.value:
      print(shlex.join(summary))
    elif status != constants.EXIT_PREEMPTED:
      subprocess.run(summary, check=False)
  return status


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
