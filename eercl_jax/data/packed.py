"""Packed FER lists: a list's decoded pixels in a tensorflow-datasets dataset (ArrayRecord files),
written by `pack_list` (the command: `python -m eercl_jax.data.pack`) and read by the runs
(docs/data.md#packed-lists).

Each record holds the decoded pixels (uint8 HxWx3, decoded by `images.load_image`, the folder
path's loader), the label (a ClassLabel feature: the class names are in the dataset's metadata),
the list index and the path relative to the image root. By default the pixels keep their original
size (lossless: a run reading the packed set gets the folder path's batches bit for bit); a
`resize` stores each image square-resized with the views' own resize. Records are written in list
order (tfds shuffling off), so record i is list entry i.

Beside the tfds files, `eercl_pack.json` records what a run checks before using the set
(`check`): the list's fingerprint, the count, the class names and the stored size. A set is
written to a temporary folder and renamed when complete.

Reading: the start-up check against the list, random access to one image through tfds's
ArrayRecord data source, and the whole set loaded into one array for the bank refresh.
tensorflow-datasets is imported inside the functions (reading does not import TensorFlow itself,
but importing tfds at module import time would tie every user of the pipelines to it).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shutil
import sys
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np

from eercl_jax.data import images, lists, transforms
from eercl_jax.errors import DataError

META_FILE = "eercl_pack.json"
FORMAT = "eercl_jax packed FER list"
FORMAT_VERSION = 1
TFDS_NAME = "fer_list"          # the tfds dataset lives in <out>/fer_list/<TFDS_VERSION>
TFDS_VERSION = "1.0.0"
SPLIT = "train"                 # one split: the whole list
_CHUNK = 256                    # images decoded ahead of the writer (bounded memory)


def relative_paths(fer_list: lists.FerList) -> list[str]:
  """The list's paths relative to its image root, with '/' separators."""
  return [os.path.relpath(p, fer_list.image_root).replace(os.sep, "/") for p in fer_list.paths]


def list_fingerprint(fer_list: lists.FerList) -> str:
  """sha256 of the list's entries as `relative/path label` lines, in order: independent of the
  image root's location, of blank lines and of a byte-order mark, changed by any edit that
  changes what a run reads (an entry added, removed, reordered, relabelled or skipped)."""
  h = hashlib.sha256()
  for rel, label in zip(relative_paths(fer_list), fer_list.labels):
    h.update(f"{rel} {int(label)}\n".encode("utf-8"))
  return h.hexdigest()


def tfds_dir(packed_dir: str) -> str:
  return os.path.join(packed_dir, TFDS_NAME, TFDS_VERSION)


def _features(class_names: Sequence[str]):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.features.FeaturesDict({
      # Raw bytes + shape: no image codec on read (the point of packing).
      "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "index": tfds.features.Scalar(dtype=np.int64),
      "path": tfds.features.Text(),
  })


def _decode(fer_list: lists.FerList, index: int, resize: int | None) -> np.ndarray:
  try:
    img = images.load_image(fer_list.paths[index])
  except DataError as e:
    raise DataError(
        f"{fer_list.list_path}:{int(fer_list.lines[index])}: {e}") from e
  if resize is not None:
    # The views' own resize, so a weak/test view of the stored image is bit-identical.
    img = transforms.resize_bilinear(img, resize, resize)
  return img


def _examples(fer_list: lists.FerList, resize: int | None,
              num_threads: int) -> Iterator[tuple[int, dict]]:
  """(key, example) in list order; images decoded on threads, a chunk at a time."""
  rel = relative_paths(fer_list)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for start in range(0, len(fer_list), _CHUNK):
      stop = min(start + _CHUNK, len(fer_list))
      images = pool.map(lambda i: _decode(fer_list, i, resize), range(start, stop))
      for i, img in zip(range(start, stop), images):
        yield i, {"image": img, "label": int(fer_list.labels[i]), "index": i, "path": rel[i]}


@functools.lru_cache(maxsize=None)
def _builder_class():
  """A tfds GeneratorBasedBuilder writing the given examples in order (shuffling off, so record
  i is list entry i). Made on first use: tfds is imported lazily. (tfds's adhoc builder would
  do the same but imports TensorFlow to test its input's type.)"""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class FerListBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = TFDS_NAME
    VERSION = tfds.core.Version(TFDS_VERSION)

    def __init__(self, *, features, examples, description, **kwargs):
      self._features, self._examples, self._description = features, examples, description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=self._description,
                                   features=self._features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
      yield from self._examples

  return FerListBuilder


def pack_list(list_path: str, image_root: str, out_dir: str, class_names: Sequence[str],
              resize: int | None = None, *, allow_outside_root: bool = False,
              overwrite: bool = False, num_threads: int | None = None,
              names_from: str = "class_names") -> str:
  """Packs `list_path` (paths relative to `image_root`) into `out_dir`; returns its absolute
  path, the directory `packed.check`/`packed.open_source` take. A run with
  `config.data.format='packed'` expects the set of list X at `<packed_root>/<stem of X>`.
  `class_names` must be the order of the list's class-order file when it has one (a
  DataError naming both otherwise; `names_from` says where they came from); they are recorded
  in the set's metadata, which the runs check against `config.data.class_names`."""
  out_dir = os.path.abspath(out_dir)
  if resize is not None and int(resize) <= 0:
    raise ValueError(f"resize must be positive or None, got {resize}")
  resize = None if resize is None else int(resize)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / "
                            "--overwrite to replace it)")
  # Every image is decoded below anyway: 'exists' here, decode failures name the line there.
  fer_list = lists.read_list(list_path, image_root, tuple(class_names), check_images="exists",
                             allow_outside_root=allow_outside_root, names_from=names_from)
  tmp = f"{out_dir}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  threads = num_threads or min(8, os.cpu_count() or 1)
  try:
    builder = _builder_class()(
        features=_features(class_names), examples=_examples(fer_list, resize, threads),
        description=f"FER list {fer_list.list_path} ({len(fer_list)} images), packed by "
                    "eercl_jax.data.pack", data_dir=tmp, file_format="array_record")
    # tfds prints its progress bars and a "prepared" line on stdout; callers (the bench's JSON
    # lines, a user's script) own stdout, so they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
      builder.download_and_prepare()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "list": fer_list.list_path, "image_root": fer_list.image_root,
        "fingerprint": list_fingerprint(fer_list), "count": len(fer_list),
        "class_names": list(class_names), "stored_size": resize,
        "tfds_dir": f"{TFDS_NAME}/{TFDS_VERSION}", "split": SPLIT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    downloads = os.path.join(tmp, "downloads")   # tfds makes an (empty) download cache
    if os.path.isdir(downloads):
      shutil.rmtree(downloads, ignore_errors=True)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("packed %d images of %s into %s (stored size %s)", len(fer_list),
               fer_list.list_path, out_dir, resize or "original")
  return out_dir


# ------------------------------------------------------------------------------------- reading

def packed_dir_for(list_path: str, packed_root: str) -> str:
  """Where a run looks for the packed set of `list_path`: <packed_root>/<list file stem>."""
  stem = os.path.splitext(os.path.basename(list_path))[0]
  return os.path.join(os.path.abspath(packed_root), stem)


def read_meta(packed_dir: str) -> dict:
  path = os.path.join(packed_dir, META_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{packed_dir}: not a packed list (no {META_FILE}); build it with "
                    "python -m eercl_jax.data.pack")
  with open(path) as f:
    try:
      meta = json.load(f)
    except ValueError as e:
      raise DataError(f"{path}: unreadable ({e})") from None
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise DataError(f"{path}: format {meta.get('format')!r} version "
                    f"{meta.get('format_version')!r}, expected {FORMAT!r} version "
                    f"{FORMAT_VERSION}; repack the list")
  return meta


# One data source per (process, directory): opened lazily where it is used (grain's worker
# processes receive only the directory name, never an open file).
_SOURCES: dict = {}


def open_source(packed_dir: str):
  """tfds's random-access ArrayRecord data source of the set (cached per process)."""
  key = (os.getpid(), packed_dir)
  if key not in _SOURCES:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = tfds.builder_from_directory(tfds_dir(packed_dir))
    _SOURCES[key] = builder.as_data_source(split=SPLIT)
  return _SOURCES[key]


def class_names_of(packed_dir: str) -> tuple[str, ...]:
  """The class names in the tfds metadata (the ClassLabel feature)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder_from_directory(tfds_dir(packed_dir))
  return tuple(builder.info.features["label"].names)


def read_image(packed_dir: str, index: int) -> np.ndarray:
  """Pixels of list entry `index` (uint8 HxWx3)."""
  try:
    return open_source(packed_dir)[int(index)]["image"]
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{packed_dir}: cannot read record {index} ({type(e).__name__}: {e})") from e


def check(fer_list: lists.FerList, packed_dir: str, resize: Optional[int]) -> dict:
  """Checks that the packed set at `packed_dir` holds `fer_list` (count, class names, list
  fingerprint, record order) stored at a size the run can use (original, or `resize`); each
  error names the mismatch, the list and the packed set. Returns the set's metadata."""
  meta = read_meta(packed_dir)
  where = f"packed set {packed_dir} (of {meta.get('list')}) vs list {fer_list.list_path}"
  fix = f"; repack with python -m eercl_jax.data.pack --list={fer_list.list_path} ..."
  if meta["count"] != len(fer_list):
    raise DataError(f"{where}: count {meta['count']} != {len(fer_list)} entries of the list{fix}")
  if tuple(meta["class_names"]) != tuple(fer_list.class_names):
    raise DataError(f"{where}: class names {tuple(meta['class_names'])} != "
                    f"{tuple(fer_list.class_names)} (config.data.class_names){fix}")
  fingerprint = list_fingerprint(fer_list)
  if meta["fingerprint"] != fingerprint:
    raise DataError(f"{where}: list fingerprint {meta['fingerprint'][:16]}... != "
                    f"{fingerprint[:16]}... (the list's entries or labels changed since "
                    f"packing){fix}")
  stored = meta["stored_size"]
  if stored is not None and resize is not None and stored != resize:
    raise DataError(f"{where}: images stored at {stored}x{stored} but config.data.resize is "
                    f"{resize}{fix} --resize={resize} (or without --resize)")
  tfds_names = class_names_of(packed_dir)
  if tfds_names != tuple(fer_list.class_names):
    raise DataError(f"{where}: the tfds metadata's class names {tfds_names} != "
                    f"{tuple(fer_list.class_names)}{fix}")
  source = open_source(packed_dir)
  if len(source) != len(fer_list):
    raise DataError(f"{where}: the tfds data source holds {len(source)} records, not "
                    f"{len(fer_list)}{fix}")
  rel = relative_paths(fer_list)
  for i in sorted({0, len(fer_list) - 1}):   # record order: cheap spot check of both ends
    record = source[i]
    path = record["path"].decode() if isinstance(record["path"], bytes) else record["path"]
    if int(record["index"]) != i or path != rel[i]:
      raise DataError(f"{where}: record {i} holds entry {int(record['index'])} ({path}), "
                      f"expected {rel[i]}{fix}")
  return meta


def attach(fer_list: lists.FerList, packed_root: str, resize: Optional[int]) -> lists.FerList:
  """`fer_list` reading its pixels from its checked packed set under `packed_root`."""
  packed_dir = packed_dir_for(fer_list.list_path, packed_root)
  check(fer_list, packed_dir, resize)
  return dataclasses.replace(fer_list, packed_dir=packed_dir)


def load_resized(packed_dir: str, size: int, num_threads: Optional[int] = None) -> np.ndarray:
  """Every image of the set square-resized to `size` (the weak/test views' resize, a no-op for
  a set stored at that size) in one uint8 (N, size, size, 3) array, in list order."""
  source = open_source(packed_dir)
  n = len(source)
  out = np.empty((n, size, size, 3), np.uint8)

  def fill(start: int) -> None:
    stop = min(start + 256, n)
    for i, record in zip(range(start, stop), source.__getitems__(range(start, stop))):
      if int(record["index"]) != i:
        raise DataError(f"{packed_dir}: record {i} holds list entry {int(record['index'])}; "
                        "the set is out of order, repack it")
      out[i] = transforms.resize_bilinear(record["image"], size, size)

  with concurrent.futures.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
    list(pool.map(fill, range(0, n, 256)))
  return out
