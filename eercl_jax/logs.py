"""Run logging: what a person reads on the terminal, everything in a log file, TensorBoard event
files and a metrics CSV. Only process 0 writes files.

Terminal and file: the terminal (absl's stderr handler) shows warnings, errors and the lines
logged with `extra=SHOW` (the progress lines, evaluations, refreshes; the final line is printed
on stdout); everything logged - the config dump, checkpoint-library (orbax) and backend lines -
goes to the run's log file, `<workdir>/logs/train.log` (`setup_file_log`). Records logged
before the file exists (start-up, backend initialisation) are kept and written to it first.
`--alsologtostderr` (absl) shows everything on the terminal again.

TensorBoard: `EventWriter` writes event files without TensorFlow, scalars as plain values
(TensorBoard's `EventAccumulator.Scalars(tag)` reads them; the tensor scalars of
`tf.summary.scalar` are invisible to it), images as PNG, the config as hparams.
"""
from __future__ import annotations

import csv
import datetime
import io
import logging as py_logging
import itertools
import os
import socket
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
_WRITERS = itertools.count()   # event files of this process (names must differ)


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


# --------------------------------------------------------------------------------- TensorBoard

class EventWriter:
  """TensorBoard event files in `logdir`, written without TensorFlow (clu's MetricWriter
  methods that the runs use: write_scalars, write_images, write_hparams, flush, close).

  Scalars are stored as plain values (`Summary.Value.simple_value`): TensorBoard shows them as
  any scalar, and `EventAccumulator(...).Scalars(tag)` returns them. Images are PNGs."""

  def __init__(self, logdir: str):
    # pylint: disable=import-outside-toplevel
    # The record framing only: tensorboard's EventFileWriter would import TensorFlow (for its
    # gfile), which a run does not otherwise need.
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.compat.proto import event_pb2
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                             f"{socket.gethostname()}.{os.getpid()}.{next(_WRITERS)}.v2")
    self._records = RecordWriter(open(self.path, "wb"))  # pylint: disable=consider-using-with
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event) -> None:
    # Written through at once: TensorBoard shows a live run, and a killed run loses nothing.
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _write(self, step: int, values: list) -> None:
    # pylint: disable-next=import-outside-toplevel
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=import-outside-toplevel
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                       for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """{tag: (H, W, C) or (N, H, W, C) uint8 (or float in 0..1)}; with N > 1 the images are
    tagged `<tag>/<i>`."""
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=import-outside-toplevel
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      for i, image in enumerate(batch):
        values.append(summary_pb2.Summary.Value(
            tag=tag if len(batch) == 1 else f"{tag}/{i}", image=_image_proto(image)))
    self._write(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=import-outside-toplevel
    self._add(event_pb2.Event(wall_time=time.time(), step=0,
                              summary=summary_v2.hparams_pb(dict(hparams))))

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()


def _image_proto(image: np.ndarray):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tensorboard.compat.proto import summary_pb2  # pylint: disable=import-outside-toplevel
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  h, w, c = image.shape
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if c == 1 else image).save(buffer, format="PNG")
  return summary_pb2.Summary.Image(height=h, width=w, colorspace=c,
                                   encoded_image_string=buffer.getvalue())


class NullWriter:
  """The writer of processes other than 0: writes nothing."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str):
  """The TensorBoard writer of `<workdir>/tensorboard` on process 0, a writer that writes
  nothing elsewhere. (Not clu's: its SummaryWriter imports TensorFlow and stores scalars as
  tensors, and its default writer also logged every scalar dict as a line.)"""
  if jax.process_index() > 0:
    return NullWriter()
  return EventWriter(os.path.join(workdir, "tensorboard"))


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
