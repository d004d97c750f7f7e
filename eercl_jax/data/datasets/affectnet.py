"""AffectNet (manually annotated part): `training.csv` and `validation.csv` (in
`Manually_Annotated_file_lists/` or the data-set folder) with columns subDirectory_filePath,
face_x, face_y, face_width, face_height, facial_landmarks, expression, valence, arousal;
expression 0..10 = neutral, happy, sad, surprise, fear, disgust, anger, contempt, none,
uncertain, no-face. 8..10 are skipped (counted); contempt is dropped unless --keep_contempt.
Images are `Manually_Annotated_Images/<subDirectory_filePath>`, listed in place, or with
`--affectnet_crop` cropped at the face box and written to
`<image_root>/affectnet/faces/<split>/<class>/` (docs/datasets.md#affectnet)."""
from __future__ import annotations

import csv
import os

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "affectnet"
SPLITS = ("train", "val")
SOURCE_SPLITS = ("train",)
TARGET_SPLITS = ("val",)
LABELS = {0: "neutral", 1: "happy", 2: "sad", 3: "surprise", 4: "fear", 5: "disgust", 6: "angry",
          7: "contempt"}
NOT_EXPRESSIONS = {8: "none", 9: "uncertain", 10: "no-face"}
COLUMNS = ("subdirectory_filepath", "face_x", "face_y", "face_width", "face_height",
           "facial_landmarks", "expression", "valence", "arousal")
FILES = {"train": "training.csv", "val": "validation.csv"}


def add_args(parser):
  parser.add_argument("--affectnet_images", default="Manually_Annotated_Images",
                      help="image folder, relative to --src (Manually_Annotated_Images)")
  parser.add_argument("--affectnet_crop", action="store_true",
                      help="crop each face box and write the crops (JPEG q95)")


def _read_csv(csv_path, split, image_dir, args, ctx):
  items = []
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
      raise DataError(f"{csv_path}: empty file")
    header = [h.strip().lower() for h in first]
    rows = reader
    if "subdirectory_filepath" not in header:   # validation.csv ships without a header
      header, rows = list(COLUMNS), _chain(first, reader)
    missing = [c for c in ("subdirectory_filepath", "expression") if c not in header]
    if missing:
      raise DataError(f"{csv_path}:1: header lacks column(s) {missing}")
    col = {c: header.index(c) for c in header}
    for row in rows:
      where = f"{csv_path}:{reader.line_num}"
      if not any(cell.strip() for cell in row):
        continue
      if len(row) != len(header):
        raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}")
      label = common.parse_int(row[col["expression"]].strip(), where, "expression")
      if label in NOT_EXPRESSIONS:
        ctx.skipped[f"label {label} ({NOT_EXPRESSIONS[label]})"] += 1
        continue
      cls = ctx.native(LABELS, label, where)
      if cls is None:
        continue
      rel = row[col["subdirectory_filepath"]].strip()
      src_image = os.path.join(image_dir, rel)
      if not args.affectnet_crop:
        items.append(common.Item(split, src_image, cls, where))
        continue
      x, y, w, h = (common.parse_int(row[col[c]].strip(), where, c)
                    for c in ("face_x", "face_y", "face_width", "face_height"))
      if w <= 0 or h <= 0:
        raise DataError(f"{where}: empty face box x={x} y={y} width={w} height={h}")
      out = ctx.out_dir("faces", split, ctx.class_names[ctx.index(cls)],
                        os.path.splitext(rel.replace("/", "_"))[0] + ".jpg")
      items.append(common.Item(split, out, cls, where, crop_from=src_image,
                               box=(x, y, x + w, y + h)))
  return items


def _chain(first, rest):
  yield first
  yield from rest


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  image_dir = common.require(src, args.affectnet_images, what="AffectNet image folder")
  items = []
  for split, name in FILES.items():
    csv_path = common.require(src, os.path.join("Manually_Annotated_file_lists", name), name,
                              what=f"AffectNet {name}")
    items += _read_csv(csv_path, split, image_dir, args, ctx)
  return items
