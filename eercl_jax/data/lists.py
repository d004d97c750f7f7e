"""FER image lists in the original's txt format: one `relative/path.jpg <label>` per line.

Paths are relative to an image root (list `data/txt/fer/labeled_source_images_raf.txt`, root
`data/fer/`, line `raf/happy/0001.jpg 3`). Every problem is reported as a `DataError` naming the
list file and, where it applies, the 1-based line, because a bad list otherwise surfaces much later
as a shape error or a silently wrong accuracy.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import logging
import numpy as np
from PIL import Image

CHECK_MODES = ("decode", "exists", "none")
_MAX_NAMED_SKIPS = 5  # how many skipped images the warning names before it only counts


class DataError(ValueError):
  """A list or image problem; the message names the list file and line."""


@dataclasses.dataclass(frozen=True)
class FerList:
  list_path: str
  image_root: str
  paths: tuple[str, ...]        # absolute image paths
  labels: np.ndarray            # int32 (N,)
  class_names: tuple[str, ...]
  lines: np.ndarray             # int32 (N,): 1-based line of each kept entry in the list file
  num_skipped: int

  def __len__(self) -> int:
    return len(self.paths)


def _image_problem(path: str, check_images: str) -> str | None:
  """Why `path` cannot be used as an image, or None if it can (as far as `check_images` looks)."""
  if check_images == "none":
    return None
  if not os.path.isfile(path):
    return "missing image"
  if check_images == "decode":
    try:
      with Image.open(path) as im:
        im.verify()
    except Exception as e:  # PIL raises many types for corrupt files; all mean "unusable"
      return f"unreadable image ({type(e).__name__}: {e})"
  return None


def read_list(list_path: str, image_root: str, class_names: Sequence[str], *,
              check_images: str = "decode", skip_bad_images: bool = False) -> FerList:
  """Parses and validates a list file.

  Malformed lines and out-of-range labels are always errors. Missing or unreadable images are
  errors unless `skip_bad_images`, in which case they are dropped, counted and logged.
  """
  if check_images not in CHECK_MODES:
    raise ValueError(f"check_images must be one of {CHECK_MODES}, got {check_images!r}")
  class_names = tuple(class_names)
  list_path = os.path.abspath(list_path)
  image_root = os.path.abspath(image_root)
  if not os.path.isfile(list_path):
    raise DataError(f"{list_path}: list file not found")
  with open(list_path, encoding="utf-8") as f:
    text_lines = f.read().splitlines()

  paths, labels, lines, skipped = [], [], [], []
  for line_no, text in enumerate(text_lines, start=1):
    where = f"{list_path}:{line_no}"
    if not text.strip():
      continue
    fields = text.split(" ")
    if len(fields) != 2 or not fields[0]:
      raise DataError(f"{where}: expected '<relative/path> <label>' separated by one space, "
                      f"got {text!r}")
    rel_path, label_text = fields
    try:
      label = int(label_text)
    except ValueError:
      raise DataError(f"{where}: label {label_text!r} is not an integer") from None
    if not 0 <= label < len(class_names):
      raise DataError(f"{where}: label {label} outside [0, {len(class_names)}) "
                      f"for classes {class_names}")
    path = os.path.join(image_root, rel_path)
    problem = _image_problem(path, check_images)
    if problem is not None:
      if not skip_bad_images:
        raise DataError(f"{where}: {problem}: {path}")
      skipped.append(f"{where}: {problem}: {path}")
      continue
    paths.append(path)
    labels.append(label)
    lines.append(line_no)

  if skipped:
    logging.warning("%s: skipped %d bad image(s), e.g.\n  %s", list_path, len(skipped),
                    "\n  ".join(skipped[:_MAX_NAMED_SKIPS]))
  if not paths:
    reason = f" (all {len(skipped)} entries had bad images)" if skipped else ""
    raise DataError(f"{list_path}: list has no usable entries{reason}")
  return FerList(list_path=list_path, image_root=image_root, paths=tuple(paths),
                 labels=np.asarray(labels, np.int32), class_names=class_names,
                 lines=np.asarray(lines, np.int32), num_skipped=len(skipped))


def count_per_class(fer_list: FerList) -> np.ndarray:
  """Number of entries of each class, int64 (C,)."""
  return np.bincount(fer_list.labels, minlength=len(fer_list.class_names))


def read_run_lists(data_config) -> tuple[FerList, dict[str, FerList]]:
  """The training list and the evaluation lists of a run's `config.data`, each validated (with
  its images) before any training starts. Generates the built-in synthetic set first if the
  config asks for it (one writer; the other processes wait)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.experimental import multihost_utils
  from eercl_jax.data import synthetic
  d = data_config
  if d.synthetic.enabled:
    params = {k: v for k, v in d.synthetic.items() if k not in ("enabled", "root")}
    if jax.process_index() == 0:
      synthetic.ensure_generated(d.synthetic.root, **params)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("synthetic data generated")
  read = lambda path: read_list(path, d.image_root, tuple(d.class_names),
                                check_images=d.check_images, skip_bad_images=d.skip_bad_images)
  train = read(d.train_list)
  evals = {name: read(path) for name, path in d.eval_lists.items()}
  for name, fl in [("train", train), *evals.items()]:
    logging.info("list %s: %s (%d images, %d skipped)", name, fl.list_path, len(fl),
                 fl.num_skipped)
  return train, evals
