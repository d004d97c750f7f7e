"""Run logging: a plain-text `<workdir>/logs/train.log` (as the original) and clu metric writers
that write TensorBoard event files to `<workdir>/tensorboard`. Only process 0 writes files."""
from __future__ import annotations

import datetime
import functools
import logging as py_logging
import os
import sys
import time
from typing import Iterable, Iterator, TextIO

import jax
import numpy as np
from absl import logging

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _QuietLibraries(py_logging.Filter):
  """orbax logs every step of every save at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def setup_file_log(workdir: str) -> str:
  """Appends the absl log to `<workdir>/logs/train.log` (appending keeps earlier runs' lines)."""
  path = os.path.join(workdir, "logs", "train.log")
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  logger = logging.get_absl_logger()
  quiet = _QuietLibraries()
  if not any(isinstance(f, _QuietLibraries) for f in logging.get_absl_handler().filters):
    logging.get_absl_handler().addFilter(quiet)
  for h in list(logger.handlers):
    if getattr(h, "_eercl_path", None) is not None:
      logger.removeHandler(h)
      h.close()
  handler = py_logging.FileHandler(path, mode="a")
  handler.setFormatter(py_logging.Formatter(_FORMAT))
  handler.addFilter(quiet)
  handler._eercl_path = path  # pylint: disable=protected-access
  logger.addHandler(handler)
  logging.set_verbosity(logging.INFO)
  return path


def file_path() -> str | None:
  """The run's log file (`setup_file_log`) of this process, if it has one."""
  for handler in logging.get_absl_logger().handlers:
    path = getattr(handler, "_eercl_path", None)
    if path is not None:
      return path
  return None


def to_file(message: str, level: int = py_logging.ERROR, exc_info=None) -> None:
  """`message` (with the traceback of `exc_info`) in the run's log file only, not on stderr:
  for what stderr says once, in its own words (a user mistake's one line)."""
  logger = logging.get_absl_logger()
  record = logger.makeRecord(logger.name, level, __file__, 0, message, None, exc_info)
  for handler in logger.handlers:
    if getattr(handler, "_eercl_path", None) is not None:
      handler.handle(record)


def create_writer(workdir: str):
  """clu's TensorBoard writer on process 0, a writer that writes nothing elsewhere; both with
  `start_session(step)` (see `_writer_classes`).

  Not clu's default writer: that one also logs every scalar dict as a line, which doubled each
  progress line (the loop logs its own readable line, and the evaluations theirs)."""
  summary_writer, writers = _writer_classes()
  if jax.process_index() > 0:
    return writers([])
  return writers([summary_writer(os.path.join(workdir, "tensorboard"))])


@functools.lru_cache(maxsize=None)
def _writer_classes():
  """(TensorBoard writer, multi-writer) classes: clu's, with `start_session(step)`.

  `start_session(step)` marks where a run's process starts (resumes) in its event file: a
  SessionLog START event at `step`, written before anything else of the session. TensorBoard
  takes the first START of a folder as the run's start and every later one as a restart, and
  discards what earlier sessions wrote at steps >= that step, so the steps a killed run logged
  past its last checkpoint (and logs again after resuming) are not shown twice.

  Defined on first use: clu's writer pulls in TensorFlow, which only a training run needs (tools
  and tests that import this package stay light; importing TensorFlow before PyTorch crashes
  some PyTorch builds)."""
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from clu import metric_writers
  from tensorflow.core.util import event_pb2
  from tensorflow.python.ops import summary_ops_v2

  class SummaryWriter(metric_writers.SummaryWriter):
    def start_session(self, step: int) -> None:
      event = event_pb2.Event(wall_time=time.time(), step=int(step),
                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
      with self._summary_writer.as_default():   # the file of this writer's other events
        summary_ops_v2.import_event(tf.constant(event.SerializeToString()))
      self.flush()

  class MultiWriter(metric_writers.MultiWriter):
    def start_session(self, step: int) -> None:
      for writer in self._writers:
        if hasattr(writer, "start_session"):
          writer.start_session(step)

  return SummaryWriter, MultiWriter


def tty_progress(items: Iterable, total: int, desc: str,
                 stream: TextIO | None = None) -> Iterator:
  """Yields `items`, showing `desc i/total` on one rewritten line of `stream` (stderr) when it
  is an interactive terminal on process 0; silent otherwise, so batch logs stay clean."""
  stream = sys.stderr if stream is None else stream
  try:
    interactive = jax.process_index() == 0 and stream.isatty()
  except (AttributeError, ValueError):   # a closed or odd stream
    interactive = False
  if not interactive:
    yield from items
    return
  start, width = time.time(), 0
  try:
    for i, item in enumerate(items, 1):
      yield item
      line = f"{desc} {i}/{total} ({time.time() - start:.0f}s)"
      width = max(width, len(line))
      stream.write("\r" + line.ljust(width))
      stream.flush()
  finally:
    if width:
      stream.write("\r" + " " * width + "\r")
      stream.flush()


class Progress:
  """Steps/s and ETA for the log lines."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.time()
    self.start_time = self.last_time

  def tick(self, step: int) -> tuple[float, str]:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = datetime.timedelta(seconds=int((self.total - step) / max(rate, 1e-9)))
    return rate, str(eta)


class MeanMetrics:
  """Running sums of per-step device metrics, fetched to the host only when logged."""

  def __init__(self):
    self.sums, self.count = {}, 0

  def add(self, metrics: dict) -> None:
    self.sums = {k: self.sums.get(k, 0.0) + v for k, v in metrics.items()}
    self.count += 1

  def pop(self) -> tuple[dict[str, float], dict[str, float]]:
    """(means, sums) since the last pop."""
    sums = to_host_scalars(self.sums)
    means = {k: v / max(self.count, 1) for k, v in sums.items()}
    self.sums, self.count = {}, 0
    return means, sums


def to_host_scalars(metrics: dict) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
