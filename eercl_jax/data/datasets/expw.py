"""ExpW: `label/label.lst`, one face per line: `image_name face_id_in_image face_box_top
face_box_left face_box_right face_box_bottom face_box_cofidence expression_label`, labels 0..6 =
angry, disgust, fear, happy, sad, surprise, neutral; images under `image/origin/`. Each face box
is cropped (clipped to the image; an empty box is an error naming its line) and written to
`<image_root>/expw/faces/<class>/<image stem>_<face_id>.<jpg|png>` (docs/datasets.md#expw)."""
from __future__ import annotations

import os

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "expw"
SPLITS = ("all",)
SOURCE_SPLITS = TARGET_SPLITS = ("all",)
LABELS = {0: "angry", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}


def add_args(parser):
  parser.add_argument("--crop_format", choices=("jpg", "png"), default="jpg",
                      help="face crops as JPEG quality 95 (default) or lossless PNG")


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  label_file = common.require(src, os.path.join("label", "label.lst"), what="ExpW label file")
  image_dir = common.require(src, os.path.join("image", "origin"), what="ExpW image folder")
  items, seen = [], {}
  for line_no, text in common.read_lines(label_file):
    where = f"{label_file}:{line_no}"
    fields = text.split()
    if len(fields) != 8:
      raise DataError(f"{where}: expected 8 fields 'image face_id top left right bottom "
                      f"confidence label', got {len(fields)}: {text!r}")
    name = fields[0]
    face_id, top, left, right, bottom = (common.parse_int(v, where, what) for v, what in zip(
        fields[1:6], ("face id", "box top", "box left", "box right", "box bottom")))
    try:
      float(fields[6])
    except ValueError:
      raise DataError(f"{where}: box confidence {fields[6]!r} is not a number") from None
    if right <= left or bottom <= top:
      raise DataError(f"{where}: empty face box top={top} left={left} right={right} "
                      f"bottom={bottom}")
    if (name, face_id) in seen:
      raise DataError(f"{where}: duplicate of {seen[name, face_id]}: face {face_id} of {name}")
    seen[name, face_id] = where
    cls = ctx.native(LABELS, common.parse_int(fields[7], where, "label"), where)
    if cls is None:
      continue
    stem = os.path.splitext(name)[0].replace("/", "_")
    out = ctx.out_dir("faces", ctx.class_names[ctx.index(cls)],
                      f"{stem}_{face_id}.{args.crop_format}")
    items.append(common.Item("all", out, cls, where, crop_from=os.path.join(image_dir, name),
                             box=(left, top, right, bottom)))
  return items
