"""Entry point of both stages: `python -m eercl_jax.main --config=configs/X.py --workdir=runs/EXP`.

`config.stage` picks the loop: 'source' (supervised source training) or 'adapt' (source-free
adaptation). Rerunning the same command resumes from the latest checkpoint in the workdir.
`--config.mode=eval` instead scores the workdir's best (or `--config.eval.checkpoint=latest`, or
a given) checkpoint on the run's evaluation lists or `--config.eval.lists` (eercl_jax/inference.py).

Exit codes (eercl_jax/constants.py): 0 done; 2 a mistake in the config, the command line or a
file (one line on stderr names it); 75 stopped by SIGTERM/SIGINT after a checkpoint (rerun to
resume); 1 any other failure (its traceback in the run's log, one FATAL line last on stderr). A
training run that fails before its first step, in a workdir that was new, leaves no run folder
(`run.removed_if_failed_early`).

The terminal shows the progress, evaluation and refresh lines, warnings, errors and the final
line; everything else (the config, checkpoint-library and backend lines) is in the run's log,
WORKDIR/logs/train.log, or WORKDIR/eval/eval.log in eval mode (eercl_jax/logs.py). absl's
`--alsologtostderr` puts every line on the terminal too.
"""
from __future__ import annotations

import atexit
import os
import sys

# TensorFlow (imported only by tensorflow-datasets, for packed lists) prints its C++ INFO lines
# straight to stderr, before any Python logging could route them: keep them off.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from eercl_jax import constants, logs  # pylint: disable=wrong-import-position
from eercl_jax.errors import UserError  # pylint: disable=wrong-import-position
from eercl_jax.tools import cli  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (default: "
    "$JAX_COORDINATOR_ADDRESS, or detected from SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes "
                                      "(default: $JAX_NUM_PROCESSES or SLURM).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index "
                                   "(default: $JAX_PROCESS_ID or SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # From here on the terminal is quiet; what is logged before the log file exists (backend
  # start-up) is kept and written to it first.
  logs.quiet_terminal()
  from eercl_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  parallel.resolve_batch_sizes(config)
  from eercl_jax import records  # pylint: disable=import-outside-toplevel
  records.set_config_file(config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    if config.mode == "eval":
      from eercl_jax import inference  # pylint: disable=import-outside-toplevel
      inference.evaluate_checkpoint(config, _WORKDIR.value)
      return
    # TensorFlow is imported for clu's metric writers (and tensorflow-datasets' packed sets):
    # keep it off the accelerators.
    _hide_accelerators_from_tensorflow()
    from eercl_jax import run as run_lib  # pylint: disable=import-outside-toplevel
    # A run that fails before its first step leaves no new run folder behind.
    with run_lib.removed_if_failed_early(_WORKDIR.value):
      os.makedirs(_WORKDIR.value, exist_ok=True)
      if config.stage == "source":
        from eercl_jax import train_source  # pylint: disable=import-outside-toplevel
        train_source.train_and_evaluate(config, _WORKDIR.value)
      elif config.stage == "adapt":
        from eercl_jax import train_adapt  # pylint: disable=import-outside-toplevel
        train_adapt.train_and_evaluate(config, _WORKDIR.value)
      else:
        raise UserError(f"config.stage: {config.stage!r}: expected 'source' or 'adapt'")
  except cli.USER_ERRORS as e:
    # A mistake in what the user gave: one line on stderr (its traceback in the run's log, when
    # the run folder stays), exit code 2.
    _last_line(f"error: {cli.one_line(str(e))}", exc_info=e)
    sys.exit(constants.EXIT_USAGE)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("the run stopped with an error")
    _last_line(f"FATAL {type(e).__name__}: {cli.one_line(str(e))}")
    raise


def _last_line(line: str, exc_info: BaseException | None = None) -> None:
  """`line` last in the log file (after the traceback of `exc_info`) and last on stderr, once:
  background threads (checkpoint writers, data workers) may print pages of secondary errors
  while the process shuts down, which would otherwise bury the cause."""
  from eercl_jax import logs  # pylint: disable=import-outside-toplevel
  if exc_info is not None:
    logs.to_file("the run stopped with an error", exc_info=(type(exc_info), exc_info,
                                                             exc_info.__traceback__))
  logs.to_file(line)
  atexit.register(_say_last, line, logs.file_path())


def _say_last(line: str, log_path: str | None) -> None:
  """At exit, before the other exit handlers (atexit runs the last registered first): `line` on
  stderr, then stderr goes to the run's log file (nowhere if there is none), so what the rest of
  the shutdown prints - e.g. TensorStore reads of a corrupt checkpoint that complete after orbax
  closed their event loop, "RuntimeError: Event loop is closed" - does not follow it."""
  print(line, file=sys.stderr, flush=True)
  target = log_path if log_path and os.path.isfile(log_path) else os.devnull
  try:
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
  except OSError:
    return
  os.dup2(fd, sys.stderr.fileno())
  os.close(fd)


def _hide_accelerators_from_tensorflow():
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError):
    pass


def run() -> None:
  # A misspelt --config.x.y or a missing config file: one line with a suggestion, exit code 2.
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG))


if __name__ == "__main__":
  run()
