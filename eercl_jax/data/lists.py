"""FER image lists in the original's txt format: one `relative/path.jpg <label>` per line.

Paths are relative to an image root (list `data/txt/fer/labeled_source_images_raf.txt`, root
`data/fer/`, line `raf/happy/0001.jpg 3`). Every problem is reported as a `DataError` naming the
list file and, where it applies, the 1-based line, because a bad list otherwise surfaces much later
as a shape error or a silently wrong accuracy.

Class order: a list's labels are bare integers, so a list written for another
`config.data.class_names` order would read without error and score the wrong classes. Beside each
list it writes, the project writes a class-order file `<list file name>.classes.json`
(`classes_path`, `write_classes`): `{"class_names": [...]}` in label order, with the count and a
fingerprint of the list's entries when it was written. The list itself keeps the original's
format (its tools ignore the extra file). `read_list` compares the class-order file with the
class names it is given and refuses a difference by name; a list without one is read with a
warning (once per list), its labels taken to index the given names
(docs/data.md#class-order-files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Optional, Sequence

from absl import logging
import numpy as np

from eercl_jax.data import images
from eercl_jax.errors import DataError

_MAX_NAMED_SKIPS = 5  # how many skipped images the warning names before it only counts
CLASSES_SUFFIX = ".classes.json"   # the class-order file: <list file name>.classes.json
CLASSES_FORMAT = "eercl_jax list class order"
_WARNED: set = set()   # (list path, what) already warned about: once per list and process


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


# ------------------------------------------------------------------------------ class order


def classes_path(list_path: str) -> str:
  """The class-order file of `list_path`: `<list file name>.classes.json` beside it."""
  return f"{list_path}{CLASSES_SUFFIX}"


def _names(class_names: Sequence[str]) -> str:
  return "(" + ", ".join(str(n) for n in class_names) + ")"


def _entries_digest(text_lines: Sequence[str]) -> tuple[int, str]:
  """(count, sha256) of a list's non-blank lines: blind to line endings, blank lines and a
  byte-order mark, changed by any edit of an entry."""
  entries = [t for t in text_lines if t.strip()]
  return len(entries), hashlib.sha256("".join(f"{t}\n" for t in entries).encode()).hexdigest()


def _read_text_lines(list_path: str) -> list[str]:
  with open(list_path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark is not a path
    return f.read().splitlines()


def write_classes(list_path: str, class_names: Sequence[str]) -> str:
  """Writes the class-order file of the list at `list_path` (which must exist): the class
  names in label order, and the list's entry count and fingerprint as it is now. Returns its
  path."""
  count, digest = _entries_digest(_read_text_lines(list_path))
  doc = {"format": CLASSES_FORMAT, "class_names": [str(n) for n in class_names],
         "list": os.path.basename(list_path), "count": count, "sha256": digest}
  path = classes_path(list_path)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return path


def write_list(list_path: str, entries: Sequence[tuple[str, int]],
               class_names: Sequence[str]) -> None:
  """Writes a list (`relative/path label` lines; replaced whole, never half-written) and its
  class-order file."""
  os.makedirs(os.path.dirname(os.path.abspath(list_path)), exist_ok=True)
  tmp = f"{list_path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(f"{rel} {int(label)}\n" for rel, label in entries)
  os.replace(tmp, list_path)
  write_classes(list_path, class_names)


def read_classes(list_path: str) -> Optional[dict]:
  """The class-order file of `list_path` as a dict (`class_names` a tuple; `count` and `sha256`
  present when the project wrote it), or None when the list has none. A hand-written
  `{"class_names": [...]}` is enough."""
  path = classes_path(list_path)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8-sig") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable class-order file ({e})") from None
  names = doc.get("class_names") if isinstance(doc, dict) else None
  if (not isinstance(names, list) or not names or
      not all(isinstance(n, str) and n for n in names)):
    raise DataError(f"{path}: a class-order file holds {{\"class_names\": [\"name\", ...]}} "
                    f"(non-empty names in label order), got {doc!r:.200}")
  if len(set(names)) != len(names):
    raise DataError(f"{path}: class names {_names(names)} repeat a name")
  return {**doc, "class_names": tuple(names)}


def _warn_once(list_path: str, what: str, message: str, *args) -> None:
  if (list_path, what) not in _WARNED:
    _WARNED.add((list_path, what))
    logging.warning(message, *args)


def check_classes(list_path: str, class_names: Sequence[str], names_from: str = "class_names",
                  text_lines: Optional[Sequence[str]] = None) -> Optional[tuple[str, ...]]:
  """Compares the list's class-order file with `class_names` (named `names_from` in the
  messages): the same names in the same order pass; the same names in another order, or other
  names, are a DataError naming both. Without a class-order file the list is taken to index
  `class_names`, with a warning (once per list). A class-order file written for another
  version of the list (count or fingerprint differ: the list was edited since) is still used,
  with a warning. Returns the file's class names, or None."""
  class_names = tuple(class_names)
  doc = read_classes(list_path)
  side = classes_path(list_path)
  if doc is None:
    _warn_once(list_path, "none", "%s has no class-order file (%s); its labels are taken to "
               "index %s %s (make_lists writes one beside each list; docs/data.md"
               "#class-order-files)", list_path, os.path.basename(side), names_from,
               _names(class_names))
    return None
  listed = doc["class_names"]
  if listed != class_names:
    fix = (f"rebuild the list with --class_names {','.join(class_names)} or set {names_from} "
           f"to {_names(listed)}")
    if sorted(listed) == sorted(class_names):
      raise DataError(f"{list_path}: labels index {_names(listed)} (its class-order file "
                      f"{side}) but {names_from} is {_names(class_names)}: the same names in "
                      f"another order, so the labels would name the wrong classes; {fix}")
    only_list = [n for n in listed if n not in class_names]
    only_given = [n for n in class_names if n not in listed]
    differ = "; ".join(
        part for part in (f"only the list has {_names(only_list)}" if only_list else "",
                          f"only {names_from} has {_names(only_given)}" if only_given else "")
        if part) or "the same names"
    raise DataError(f"{list_path}: labels index {_names(listed)} (its class-order file {side}) "
                    f"but {names_from} is {_names(class_names)} ({differ}); {fix}")
  if "count" in doc or "sha256" in doc:
    count, digest = _entries_digest(_read_text_lines(list_path) if text_lines is None
                                    else text_lines)
    if doc.get("count", count) != count or doc.get("sha256", digest) != digest:
      _warn_once(list_path, "stale", "%s: the list changed since its class-order file %s was "
                 "written (%s entries then, %d now); its class order %s is still used (rewrite "
                 "the file with lists.write_classes once the list is right)", list_path, side,
                 doc.get("count", "?"), count, _names(listed))
  return listed


# ------------------------------------------------------------------------------ reading


def read_list(list_path: str, image_root: str, class_names: Sequence[str], *,
              check_images: str = "decode", skip_bad_images: bool = False,
              allow_outside_root: bool = False,
              names_from: str = "class_names") -> FerList:
  """Parses and validates a list file.

  The list's class-order file must hold `class_names` in the same order (`check_classes`;
  `names_from` names where they come from in the messages, e.g. 'config.data.class_names');
  a list without one reads with a warning. Malformed lines, labels that are not plain
  non-negative integers or are out of range, and paths that leave `image_root` (absolute, or
  through '..'; unless `allow_outside_root`) are always errors. A UTF-8 byte-order mark is
  ignored. Duplicate paths are reported (each copy would be its own nearest neighbour in the
  adaptation banks). Missing or undecodable images are errors unless `skip_bad_images`, in
  which case they are dropped, counted and logged.
  """
  if check_images not in images.CHECK_MODES:
    raise ValueError(f"check_images must be one of {images.CHECK_MODES}, got {check_images!r}")
  class_names = tuple(class_names)
  list_path = os.path.abspath(list_path)
  image_root = os.path.abspath(image_root)
  if not os.path.isfile(list_path):
    raise DataError(f"{list_path}: list file not found")
  text_lines = _read_text_lines(list_path)
  # Before the labels: a list of another class order or count is named as such, not as a
  # label out of range.
  check_classes(list_path, class_names, names_from, text_lines)

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
