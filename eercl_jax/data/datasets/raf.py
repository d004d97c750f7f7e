"""RAF-DB basic: `EmoLabel/list_patition_label.txt` (sic), one `train_00001.jpg 5` per line,
labels 1..7 = surprise, fear, disgust, happy, sad, angry, neutral; the split is the file name's
prefix (`train_` / `test_`). Images: `Image/aligned/train_00001_aligned.jpg` (100x100 aligned
faces, the default) or `Image/original/train_00001.jpg` (docs/datasets.md#raf-db-basic)."""
from __future__ import annotations

import os

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "raf"
SPLITS = ("train", "test")
SOURCE_SPLITS = ("train",)
TARGET_SPLITS = ("test",)
LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "angry", 7: "neutral"}


def add_args(parser):
  parser.add_argument("--raf_images", choices=("aligned", "original"), default="aligned",
                      help="Image/aligned/*_aligned.jpg (default) or Image/original/*.jpg")


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  label_file = common.require(src, os.path.join("EmoLabel", "list_patition_label.txt"),
                              os.path.join("EmoLabel", "list_partition_label.txt"),
                              what="RAF-DB label file")
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
