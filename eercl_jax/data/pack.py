"""Packs an FER list into a tensorflow-datasets dataset in the ArrayRecord file format.

  python -m eercl_jax.data.pack --list=data/txt/fer/unlabeled_target_images_expw_0.txt \
      --image_root=data/fer --out=data/packed/unlabeled_target_images_expw_0 [--resize=256]

Each record holds the decoded pixels (uint8 HxWx3, decoded by `transforms.load_image`, the
folder path's loader), the label (a ClassLabel feature: the class names are in the dataset's
metadata), the list index and the path relative to the image root. By default the pixels keep
their original size (lossless: a run reading the packed set gets the folder path's batches bit
for bit); `--resize=R` stores each image square-resized to R x R with the views' own resize
(docs/data.md#packed-lists). Records are written in list order (tfds shuffling off), so record i
is list entry i.

Beside the tfds files, `eercl_pack.json` records what a run checks before using the set
(`packed.check`): the list's fingerprint, the count, the class names and the stored size.
The output is written to a temporary folder and renamed when complete.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import json
import os
import shutil
import sys
from typing import Iterator, Sequence

from absl import app, flags, logging
import numpy as np

from eercl_jax.data import lists, transforms

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
    img = transforms.load_image(fer_list.paths[index])
  except transforms.DataError as e:
    raise transforms.DataError(
        f"{fer_list.list_path}:{int(fer_list.lines[index])}: {e}") from e
  if resize is not None:
    # The views' own resize, so a weak/test view of the stored image is bit-identical.
    img = transforms._resize(img, resize, resize)  # pylint: disable=protected-access
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
              overwrite: bool = False, num_threads: int | None = None) -> str:
  """Packs `list_path` (paths relative to `image_root`) into `out_dir`; returns its absolute
  path, the directory `packed.check`/`packed.open_source` take. A run with
  `config.data.format='packed'` expects the set of list X at `<packed_root>/<stem of X>`."""
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
                             allow_outside_root=allow_outside_root)
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


# --------------------------------------------------------------------------------------- CLI

def _define_flags() -> dict:
  """The CLI's flags, defined only when the module runs as the command (importing the module
  for `pack_list` must not add flags to another program's)."""
  f = flags
  return {
      "list": f.DEFINE_string("list", None, "FER list file (`relative/path label` lines)."),
      "image_root": f.DEFINE_string("image_root", None,
                                    "folder the list's paths are relative to."),
      "out": f.DEFINE_string("out", None, "output folder of the packed set; a run finds list "
                             "X's set at <config.data.packed_root>/<stem of X>."),
      "resize": f.DEFINE_integer("resize", None, "store each image square-resized to this size "
                                 "(config.data.resize); default: original size, lossless."),
      "class_names": f.DEFINE_list("class_names", None, "class names in label order; default: "
                                   "config_defaults.FER_CLASSES."),
      "overwrite": f.DEFINE_bool("overwrite", False, "replace an existing output folder."),
      "allow_outside_root": f.DEFINE_bool("allow_outside_root", False, "allow list paths that "
                                          "are absolute or climb out of the image root."),
  }


_FLAGS: dict = {}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=import-outside-toplevel
  from eercl_jax import config_defaults
  v = {name: flag.value for name, flag in _FLAGS.items()}
  for name in ("list", "image_root", "out"):
    if not v[name]:
      raise app.UsageError(f"--{name} is required")
  class_names = v["class_names"] or config_defaults.FER_CLASSES
  try:
    out = pack_list(v["list"], v["image_root"], v["out"], class_names, v["resize"],
                    allow_outside_root=v["allow_outside_root"], overwrite=v["overwrite"])
  except (lists.DataError, FileExistsError, ValueError) as e:
    print(f"FATAL: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(out, flush=True)


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  app.run(main)
