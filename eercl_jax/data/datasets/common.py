"""What every data-set reader of `make_lists` shares: the expression names, their aliases, the
record a reader yields, and the context through which it maps native labels to
`config.data.class_names` (docs/datasets.md#class-names-and-native-label-orders).

A reader yields `Item`s (one image with its native split and canonical class name, and where it
came from: the label file and line, or the folder); `make_lists` checks them together (duplicates,
missing files, paths inside the image root), writes the images it must create (FER2013 pixel rows,
face crops), then the lists and the counts table.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from eercl_jax.errors import DataError

# Canonical expression names (the project's default spelling); `contempt` is the eighth class of
# CK+ and AffectNet, dropped unless asked for.
EXPRESSIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise", "contempt")
ALIASES = {
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "disgusting": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "happily": "happy",
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "contempt": "contempt", "contemptuous": "contempt",
}
def canonical(name: str) -> str:
  """The canonical expression a (folder or class) name spells, case-insensitively; an unknown
  name comes back lower-cased and stripped (and will not match any class)."""
  key = name.strip().lower()
  return ALIASES.get(key, key)


def is_junk(name: str) -> bool:
  """Files that archive tools and file browsers leave behind: never images of a data set."""
  return name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini")


@dataclasses.dataclass
class Item:
  split: str                 # the data set's own split: 'train', 'test', 'privatetest', 'all', ...
  path: str                  # absolute path of the image (existing, or to be written)
  cls: str                   # canonical class name (a member of the context's class_names)
  where: str                 # 'file:line' or the file itself: what an error message names
  pixels: Optional[np.ndarray] = None           # write these (uint8 HxW or HxWx3) to `path`
  crop_from: Optional[str] = None               # or crop this image ...
  box: Optional[tuple[int, int, int, int]] = None  # ... at (left, top, right, bottom), clipped

  @property
  def written(self) -> bool:
    return self.pixels is not None or self.crop_from is not None


class Context:
  """Options shared by the readers and the native-label -> class-name mapping."""

  def __init__(self, class_names: Sequence[str], image_root: str, domain: str,
               keep_contempt: bool = False):
    self.class_names = tuple(class_names)
    self.image_root = os.path.abspath(image_root)
    self.domain = domain
    self.keep_contempt = keep_contempt
    self._index = {}
    for i, name in enumerate(self.class_names):
      c = canonical(name)
      if c in self._index:
        raise DataError(f"class_names {self.class_names}: {name!r} and "
                        f"{self.class_names[self._index[c]]!r} name the same expression")
      self._index[c] = i
    if keep_contempt and "contempt" not in self._index:
      raise DataError(f"keeping contempt needs 'contempt' in class_names, got {self.class_names}")
    self.skipped = collections.Counter()   # reason -> how many records were left out on purpose

  def index(self, cls: str) -> int:
    return self._index[cls]

  def resolve(self, name: str, where: str, what: str = "class", count: int = 1) -> Optional[str]:
    """Canonical class name of `name` if it is one of class_names; None for contempt when it is
    dropped (counted as `count` records); otherwise a DataError naming `where`."""
    c = canonical(name)
    if c == "contempt" and not self.keep_contempt:
      self.skipped["contempt (dropped; --keep_contempt keeps it)"] += count
      return None
    if c not in self._index:
      raise DataError(f"{where}: {what} {name!r} is not one of class_names {self.class_names} "
                      f"(names are matched case-insensitively, with aliases such as "
                      f"'anger'->'angry', 'happiness'->'happy', 'sadness'->'sad', "
                      f"'surprised'->'surprise')")
    return c

  def native(self, table: dict, label: int, where: str) -> Optional[str]:
    """Maps a data set's native integer label through its table, then `resolve`."""
    if label not in table:
      known = ", ".join(f"{k}={v}" for k, v in sorted(table.items()))
      raise DataError(f"{where}: label {label} is not one of this data set's labels ({known})")
    return self.resolve(table[label], where, what=f"label {label} =")

  def out_dir(self, *parts: str) -> str:
    """Where written images go: <image_root>/<domain>/<parts...>."""
    return os.path.join(self.image_root, self.domain, *parts)


def find(parent: str, name: str) -> Optional[str]:
  """`parent/name` if it exists, else the one entry of `parent` that matches `name`
  case-insensitively (archives of these data sets differ in capitalisation), else None."""
  path = os.path.join(parent, name)
  if os.path.exists(path):
    return path
  if os.path.isdir(parent):
    hits = [e for e in os.listdir(parent) if e.lower() == name.lower()]
    if len(hits) == 1:
      return os.path.join(parent, hits[0])
  return None


def require(parent: str, *names: str, what: str = "") -> str:
  """The first of `parent/<name>` that exists (see `find`), or a DataError listing them."""
  for name in names:
    path = find(parent, name)
    if path is not None:
      return path
  tried = ", ".join(os.path.join(parent, n) for n in names)
  raise DataError(f"{what or 'file'} not found: tried {tried}")


def read_lines(path: str) -> list[tuple[int, str]]:
  """(1-based line number, text) of each non-blank line; a byte-order mark is ignored."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  with open(path, encoding="utf-8-sig", errors="strict") as f:
    return [(n, t.rstrip("\r\n")) for n, t in enumerate(f, 1) if t.strip()]


def parse_int(text: str, where: str, what: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise DataError(f"{where}: {what} {text!r} is not an integer") from None
