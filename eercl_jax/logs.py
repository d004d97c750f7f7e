"""Run logging: what a person reads on the terminal, everything in a log file, TensorBoard event
files and a metrics CSV. Only process 0 writes files.

Terminal and file: the terminal (absl's stderr handler) shows warnings, errors and the lines
logged with `extra=SHOW` (the progress lines, evaluations, refreshes; the final line is printed
on stdout); everything logged - the config dump, checkpoint-library (orbax) and backend lines -
goes to the run's log file, `<workdir>/logs/train.log` (`setup_file_log`). Records logged
before the file exists (start-up, backend initialisation) are kept and written to it first.
`--alsologtostderr` (absl) shows everything on the terminal again.

TensorBoard event files: eercl_jax/event_files.py.
"""
from __future__ import annotations

import csv
import datetime
import logging as py_logging
import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TextIO

import jax
import numpy as np
from absl import flags, logging

# The file's lines name their source file: the log also holds the libraries' own lines.
_FORMAT = "%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"
SHOW = {"show": True}   # `extra=` of a log call whose line also belongs on the terminal
_EARLY_LIMIT = 10000    # records kept for the log file before it exists


class _Terminal(py_logging.Filter):
  """What reaches the terminal: warnings, errors and the lines logged with `extra=SHOW`."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or bool(getattr(record, "show", False))


class _Early(py_logging.Handler):
  """Holds the records logged before the log file exists (`setup_file_log` writes them)."""

  def __init__(self):
    super().__init__(py_logging.NOTSET)
    self.records: list[py_logging.LogRecord] = []

  def emit(self, record):
    if len(self.records) < _EARLY_LIMIT:
      self.records.append(record)


def _everything_on_terminal() -> bool:
  """absl's --logtostderr / --alsologtostderr: the user asked for every line on stderr."""
  try:
    return flags.FLAGS.is_parsed() and bool(flags.FLAGS["alsologtostderr"].value or
                                            flags.FLAGS["logtostderr"].value)
  except (KeyError, AttributeError):
    return False


def quiet_terminal(keep_early: bool = True) -> None:
  """Keeps the terminal to warnings, errors and `SHOW` lines (idempotent); with `keep_early`,
  holds what is logged from now on until `setup_file_log` names the log file."""
  handler = logging.get_absl_handler()
  if not _everything_on_terminal() and \
      not any(isinstance(f, _Terminal) for f in handler.filters):
    handler.addFilter(_Terminal())
  root = py_logging.getLogger()
  if keep_early and not any(isinstance(h, _Early) for h in root.handlers):
    root.addHandler(_Early())


def setup_file_log(workdir: str, path: str | None = None) -> str:
  """Appends every log record (absl's and the libraries': orbax, jax) to the file `path`,
  default `<workdir>/logs/train.log` (appending keeps earlier runs' lines), and keeps the
  terminal quiet (`quiet_terminal`). Records held since start-up are written first."""
  path = path or os.path.join(workdir, "logs", "train.log")
  quiet_terminal(keep_early=False)
  root = py_logging.getLogger()
  early = [h for h in root.handlers if isinstance(h, _Early)]
  for h in early:
    root.removeHandler(h)
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  for logger in (root, logging.get_absl_logger()):   # an earlier run's file of this process
    for h in list(logger.handlers):
      if getattr(h, "_eercl_path", None) is not None:
        logger.removeHandler(h)
        h.close()
  handler = py_logging.FileHandler(path, mode="a")
  handler.setFormatter(py_logging.Formatter(_FORMAT))
  handler._eercl_path = path  # pylint: disable=protected-access
  for h in early:
    for record in h.records:
      handler.handle(record)
  # On the root logger: absl's records reach it, and so do the libraries' own loggers.
  root.addHandler(handler)
  logging.set_verbosity(logging.INFO)
  return path


def _file_handlers() -> list:
  """The handlers of the run's log file (`setup_file_log`: on the root logger)."""
  loggers = (py_logging.getLogger(), logging.get_absl_logger())
  return [h for lg in loggers for h in lg.handlers if getattr(h, "_eercl_path", None)]


def file_path() -> str | None:
  """The run's log file (`setup_file_log`) of this process, if it has one."""
  handlers = _file_handlers()
  return handlers[0]._eercl_path if handlers else None  # pylint: disable=protected-access


def to_file(message: str, level: int = py_logging.ERROR, exc_info=None) -> None:
  """`message` (with the traceback of `exc_info`) in the run's log file only, not on stderr:
  for what stderr says once, in its own words (a user mistake's one line)."""
  logger = logging.get_absl_logger()
  record = logger.makeRecord(logger.name, level, __file__, 0, message, None, exc_info)
  for handler in _file_handlers():
    handler.handle(record)


# --------------------------------------------------------------------------------- metrics CSV

class MetricsCsv:
  """A CSV with a row per evaluation (like timm's summary.csv): the header is written with the
  first row; a later row's columns follow that header (a missing value is left empty).

  `prune(step)` drops the rows of steps after `step` (a resumed run recomputes them: the
  attempt that wrote them was killed before its next checkpoint)."""

  def __init__(self, path: str):
    self.path = path

  def rows(self) -> list[dict[str, str]]:
    if not os.path.isfile(self.path):
      return []
    with open(self.path, newline="", encoding="utf-8") as f:
      return list(csv.DictReader(f))

  def header(self) -> list[str] | None:
    if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
      return None
    with open(self.path, newline="", encoding="utf-8") as f:
      return next(csv.reader(f), None)

  def prune(self, last_step: int, keep_last: bool = True) -> int:
    """Drops the rows whose step is after `last_step` (or not before it, when not
    `keep_last`); returns how many."""
    header, rows = self.header(), self.rows()
    keep = [r for r in rows if _step_of(r) < last_step or (keep_last and _step_of(r) == last_step)]
    if header is None or len(keep) == len(rows):
      return 0
    tmp = f"{self.path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=header)
      writer.writeheader()
      writer.writerows(keep)
    os.replace(tmp, self.path)
    return len(rows) - len(keep)

  def append(self, row: Mapping[str, Any]) -> None:
    header = self.header()
    new = header is None
    if new:
      header = list(row)
    else:
      extra = [k for k in row if k not in header]
      if extra:
        logging.warning("%s: the columns %s are not in its header; not written", self.path,
                        extra)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
      if new:
        writer.writeheader()
      writer.writerow({k: _cell(v) for k, v in row.items()})


def _step_of(row: Mapping[str, str]) -> int:
  try:
    return int(row.get("step", ""))
  except ValueError:
    return -1


def _cell(value: Any) -> Any:
  """Floats with all their digits (repr); NaN as an empty cell."""
  if isinstance(value, (float, np.floating)):
    return "" if not np.isfinite(value) else repr(float(value))
  return value


# ----------------------------------------------------------------------------------- progress

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
