"""FER image lists in the original's txt format: one `relative/path.jpg <label>` per line.

Paths are relative to an image root (list `data/txt/fer/labeled_source_images_raf.txt`, root
`data/fer/`, line `raf/happy/0001.jpg 3`). Every problem is reported as a `DataError` naming the
list file and, where it applies, the 1-based line, because a bad list otherwise surfaces much later
as a shape error or a silently wrong accuracy.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from absl import logging
import numpy as np

from eercl_jax.data import images
from eercl_jax.errors import DataError

_MAX_NAMED_SKIPS = 5  # how many skipped images the warning names before it only counts


@dataclasses.dataclass(frozen=True)
class FerList:
  list_path: str
  image_root: str
  paths: tuple[str, ...]        # absolute image paths
  labels: np.ndarray            # int32 (N,)
  class_names: tuple[str, ...]
  lines: np.ndarray             # int32 (N,): 1-based line of each kept entry in the list file
  num_skipped: int
  # A checked packed set holding these images (data/packed.py); None: decode `paths`.
  packed_dir: str | None = None

  def __len__(self) -> int:
    return len(self.paths)


_LABEL = re.compile(r"[0-9]+")


def read_list(list_path: str, image_root: str, class_names: Sequence[str], *,
              check_images: str = "decode", skip_bad_images: bool = False,
              allow_outside_root: bool = False) -> FerList:
  """Parses and validates a list file.

  Malformed lines, labels that are not plain non-negative integers or are out of range, and
  paths that leave `image_root` (absolute, or through '..'; unless `allow_outside_root`) are
  always errors. A UTF-8 byte-order mark is ignored. Duplicate paths are reported (each copy
  would be its own nearest neighbour in the adaptation banks). Missing or undecodable images
  are errors unless `skip_bad_images`, in which case they are dropped, counted and logged.
  """
  if check_images not in images.CHECK_MODES:
    raise ValueError(f"check_images must be one of {images.CHECK_MODES}, got {check_images!r}")
  class_names = tuple(class_names)
  list_path = os.path.abspath(list_path)
  image_root = os.path.abspath(image_root)
  if not os.path.isfile(list_path):
    raise DataError(f"{list_path}: list file not found")
  with open(list_path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark is not a path
    text_lines = f.read().splitlines()

  entries, skipped = [], []
  for line_no, text in enumerate(text_lines, start=1):
    where = f"{list_path}:{line_no}"
    if not text.strip():
      continue
    fields = text.split(" ")
    if len(fields) != 2 or not fields[0]:
      raise DataError(f"{where}: expected '<relative/path> <label>' separated by one space, "
                      f"got {text!r}")
    rel_path, label_text = fields
    if not _LABEL.fullmatch(label_text):
      if label_text.lstrip("+-").isdigit():
        raise DataError(f"{where}: label {label_text!r} outside [0, {len(class_names)}) for "
                        f"classes {class_names} (write labels as plain digits)")
      raise DataError(f"{where}: label {label_text!r} is not an integer")
    label = int(label_text)
    if not 0 <= label < len(class_names):
      raise DataError(f"{where}: label {label} outside [0, {len(class_names)}) "
                      f"for classes {class_names}")
    path = os.path.normpath(os.path.join(image_root, rel_path))
    if not allow_outside_root and (os.path.isabs(rel_path) or
                                   os.path.commonpath([path, image_root]) != image_root):
      raise DataError(f"{where}: path {rel_path!r} leaves the image root {image_root} (set "
                      "config.data.allow_outside_root=True to allow it)")
    entries.append((path, label, line_no, where))

  problems = images.check_images([e[0] for e in entries], check_images)
  paths, labels, lines = [], [], []
  for (path, label, line_no, where), problem in zip(entries, problems):
    if problem is not None:
      if not skip_bad_images:
        raise DataError(f"{where}: {problem}: {path}")
      skipped.append(f"{where}: {problem}: {path}")
      continue
    paths.append(path)
    labels.append(label)
    lines.append(line_no)

  first_line = {}
  duplicates = []
  for path, line_no in zip(paths, lines):
    if path in first_line:
      duplicates.append(f"line {line_no} repeats line {first_line[path]}: {path}")
    else:
      first_line[path] = line_no
  if duplicates:
    logging.warning("%s: %d duplicate entries (each is its own neighbour in the adaptation "
                    "banks), e.g.\n  %s", list_path, len(duplicates),
                    "\n  ".join(duplicates[:_MAX_NAMED_SKIPS]))

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
