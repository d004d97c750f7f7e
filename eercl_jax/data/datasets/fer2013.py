"""FER2013: `fer2013.csv` with columns emotion, pixels, Usage; `pixels` is 48x48 = 2304
space-separated grey values, emotion 0..6 = angry, disgust, fear, happy, sad, surprise, neutral,
Usage Training / PublicTest / PrivateTest. Each row is written out as a lossless PNG,
`<image_root>/fer2013/<split>/<class>/<row>.png` (`row` = 0-based data row)
(docs/datasets.md#fer2013)."""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "fer2013"
SPLITS = ("train", "publictest", "privatetest")
SOURCE_SPLITS = ("train",)
TARGET_SPLITS = ("privatetest",)
LABELS = {0: "angry", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}
USAGE = {"training": "train", "publictest": "publictest", "privatetest": "privatetest"}
SIDE = 48


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  del args
  csv_path = src if os.path.isfile(src) else common.require(
      src, "fer2013.csv", os.path.join("fer2013", "fer2013.csv"), what="FER2013 csv")
  items = []
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in ("emotion", "pixels", "usage") if c not in header]
    if missing:
      raise DataError(f"{csv_path}:1: header lacks column(s) {missing}, got {header}")
    col = {c: header.index(c) for c in ("emotion", "pixels", "usage")}
    for row_index, row in enumerate(reader):
      where = f"{csv_path}:{reader.line_num}"
      if not any(cell.strip() for cell in row):
        continue
      if len(row) != len(header):
        raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}")
      usage = row[col["usage"]].strip()
      split = USAGE.get(usage.lower())
      if split is None:
        raise DataError(f"{where}: Usage {usage!r} is not one of Training, PublicTest, "
                        "PrivateTest")
      cls = ctx.native(LABELS, common.parse_int(row[col["emotion"]].strip(), where, "emotion"),
                       where)
      if cls is None:
        continue
      # np.fromstring parses 5x faster than np.array(text.split()); a bad token raises (numpy
      # 2.x) or, in older numpy, ends the parse early with a warning, and the count check fails.
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", DeprecationWarning)
          pixels = np.fromstring(row[col["pixels"]], dtype=np.int64, sep=" ")
      except ValueError:
        raise DataError(f"{where}: pixels are not space-separated integers") from None
      if pixels.size != SIDE * SIDE:
        raise DataError(f"{where}: expected {SIDE * SIDE} grey values, got {pixels.size}")
      if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{where}: grey values outside 0..255 ({pixels.min()}..{pixels.max()})")
      name = ctx.class_names[ctx.index(cls)]
      path = ctx.out_dir(split, name, f"{row_index:05d}.png")
      items.append(common.Item(split, path, cls, where,
                               pixels=pixels.astype(np.uint8).reshape(SIDE, SIDE)))
  return items
