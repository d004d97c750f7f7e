"""TensorBoard event files of a run: a clu `MetricWriter` that stores scalars as plain values
(TensorBoard's `EventAccumulator.Scalars(tag)` reads them; the tensor scalars of clu's
SummaryWriter / `tf.summary.scalar` are invisible to it), images as PNG, the config as hparams.
Both writers have `start_session(step)`: where a run's process starts (resumes) in its event
file, a SessionLog START event at `step`. TensorBoard discards what earlier sessions wrote at
steps >= that step, so the steps a killed run logged past its last checkpoint (and logs again
after resuming) are not shown twice.

(Its own module, imported when a run starts: clu's metric_writers package imports TensorFlow,
which the commands that write no event file need not pay for.)"""
from __future__ import annotations

import io
import itertools
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

_WRITERS = itertools.count()   # event files of this process (names must differ)


class EventWriter(metric_writers.MetricWriter):
  """TensorBoard event files in `logdir`, a clu `MetricWriter` written without TensorFlow.

  Scalars are stored as plain values (`Summary.Value.simple_value`): TensorBoard shows them as
  any scalar, and `EventAccumulator(...).Scalars(tag)` returns them (clu's own SummaryWriter
  stores them as tensors, which that API does not return, and imports TensorFlow). Images are
  PNGs. The kinds the runs do not write (texts, audio, video, histograms, raw summaries) are
  refused by name; for those, combine with clu's SummaryWriter (metric_writers.MultiWriter)."""

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

  def _unsupported(self, kind: str):
    raise NotImplementedError(f"{type(self).__name__} writes scalars, images and hparams, not "
                              f"{kind}: combine it with clu's SummaryWriter for those")

  def write_summaries(self, step, values, metadata=None):
    self._unsupported("raw summaries")

  def write_texts(self, step, texts):
    self._unsupported("texts")

  def write_audios(self, step, audios, *, sample_rate):
    self._unsupported("audio")

  def write_videos(self, step, videos):
    self._unsupported("videos")

  def write_histograms(self, step, arrays, num_buckets=None):
    self._unsupported("histograms")

  def start_session(self, step: int) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step), session_log=start))

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


class SilentWriter(metric_writers.MultiWriter):
  """The writer of the processes other than 0: clu's MultiWriter of no writer."""

  def __init__(self):
    super().__init__([])

  def start_session(self, step: int) -> None:
    del step


def create_writer(workdir: str):
  """The TensorBoard writer (a clu MetricWriter) of `<workdir>/tensorboard` on process 0; on
  the other processes clu's MultiWriter of no writer, which writes nothing."""
  if jax.process_index() > 0:
    return SilentWriter()
  return EventWriter(os.path.join(workdir, "tensorboard"))


