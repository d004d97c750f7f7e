"""Reading packed FER lists (made by `eercl_jax.data.pack`): the start-up check against the list,
random access to one image through tfds's ArrayRecord data source, and the whole set loaded into
one array for the bank refresh (docs/data.md#packed-lists).

tensorflow-datasets is imported inside the functions (reading does not import TensorFlow
itself, but importing tfds at module import time would tie every user of the pipelines to it).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Optional

import numpy as np

from eercl_jax.data import lists, pack, transforms

DataError = lists.DataError


def packed_dir_for(list_path: str, packed_root: str) -> str:
  """Where a run looks for the packed set of `list_path`: <packed_root>/<list file stem>."""
  stem = os.path.splitext(os.path.basename(list_path))[0]
  return os.path.join(os.path.abspath(packed_root), stem)


def read_meta(packed_dir: str) -> dict:
  path = os.path.join(packed_dir, pack.META_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{packed_dir}: not a packed list (no {pack.META_FILE}); build it with "
                    "python -m eercl_jax.data.pack")
  with open(path) as f:
    try:
      meta = json.load(f)
    except ValueError as e:
      raise DataError(f"{path}: unreadable ({e})") from None
  if meta.get("format") != pack.FORMAT or meta.get("format_version") != pack.FORMAT_VERSION:
    raise DataError(f"{path}: format {meta.get('format')!r} version "
                    f"{meta.get('format_version')!r}, expected {pack.FORMAT!r} version "
                    f"{pack.FORMAT_VERSION}; repack the list")
  return meta


# One data source per (process, directory): opened lazily where it is used (grain's worker
# processes receive only the directory name, never an open file).
_SOURCES: dict = {}


def open_source(packed_dir: str):
  """tfds's random-access ArrayRecord data source of the set (cached per process)."""
  key = (os.getpid(), packed_dir)
  if key not in _SOURCES:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = tfds.builder_from_directory(pack.tfds_dir(packed_dir))
    _SOURCES[key] = builder.as_data_source(split=pack.SPLIT)
  return _SOURCES[key]


def class_names_of(packed_dir: str) -> tuple[str, ...]:
  """The class names in the tfds metadata (the ClassLabel feature)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder_from_directory(pack.tfds_dir(packed_dir))
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
  fingerprint = pack.list_fingerprint(fer_list)
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
  rel = pack.relative_paths(fer_list)
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
      out[i] = transforms._resize(record["image"], size, size)  # pylint: disable=protected-access

  with concurrent.futures.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
    list(pool.map(fill, range(0, n, 256)))
  return out
