"""RAF-DB basic: `EmoLabel/list_patition_label.txt` (sic), one `train_00001.jpg 5` per line,
labels 1..7 = surprise, fear, disgust, happy, sad, angry, neutral; the split is the file name's
prefix (`train_` / `test_`). Images: `Image/aligned/train_00001_aligned.jpg` (100x100 aligned
faces, the default) or `Image/original/train_00001.jpg` (docs/datasets.md#raf-db-basic).

The archive unpacks as `basic/` holding these: `--src` may name `basic/` itself or the folder
that holds it (the default `data/fer/raf`, where the archive was unpacked)."""
from __future__ import annotations

import os

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "raf"
SPLITS = ("train", "test")
SOURCE_SPLITS = ("train",)
TARGET_SPLITS = ("test",)
LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "angry", 7: "neutral"}
ARCHIVE_DIR = "basic"   # the top folder of the RAF-DB basic archive
_LABEL_FILES = (os.path.join("EmoLabel", "list_patition_label.txt"),   # (sic), as shipped
                os.path.join("EmoLabel", "list_partition_label.txt"))


def add_args(parser):
  parser.add_argument("--raf_images", choices=("aligned", "original"), default="aligned",
                      help="Image/aligned/*_aligned.jpg (default) or Image/original/*.jpg")


def _label_file(folder: str) -> str | None:
  for name in _LABEL_FILES:
    path = common.find(folder, os.path.dirname(name))
    path = path and common.find(path, os.path.basename(name))
    if path and os.path.isfile(path):
      return path
  return None


def locate(src: str) -> tuple[str, str]:
  """(the folder holding EmoLabel/ and Image/, its label file): `src` itself or its `basic/`;
  otherwise a DataError saying where it looked and where to point --src."""
  basic = common.find(src, ARCHIVE_DIR) or os.path.join(src, ARCHIVE_DIR)
  for folder in (src, basic):
    label_file = _label_file(folder)
    if label_file is not None:
      return folder, label_file
  looked = os.path.join(src, _LABEL_FILES[0])
  looked_basic = os.path.join(basic, _LABEL_FILES[0])
  missing = "" if os.path.isdir(src) else f" ({src} does not exist)"
  raise DataError(f"RAF-DB label file not found: looked for {looked} and {looked_basic}"
                  f"{missing}; point --src at the folder that holds the archive's "
                  f"{ARCHIVE_DIR}/ (or at {ARCHIVE_DIR}/ itself), the one with "
                  f"EmoLabel/ and Image/")


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  src, label_file = locate(src)
  image_dir = common.require(src, os.path.join("Image", args.raf_images),
                             what="RAF-DB image folder")
  items = []
  for line_no, text in common.read_lines(label_file):
    where = f"{label_file}:{line_no}"
    fields = text.split()
    if len(fields) != 2:
      raise DataError(f"{where}: expected '<name>.jpg <label 1..7>', got {text!r}")
    name, label_text = fields
    split = name.split("_", 1)[0].lower()
    if split not in SPLITS or "/" in name or "\\" in name:
      raise DataError(f"{where}: file name {name!r} does not start with 'train_' or 'test_'")
    cls = ctx.native(LABELS, common.parse_int(label_text, where, "label"), where)
    if cls is None:
      continue
    if args.raf_images == "aligned":
      stem, ext = os.path.splitext(name)
      name = f"{stem}_aligned{ext}"
    items.append(common.Item(split, os.path.join(image_dir, name), cls, where))
  return items
