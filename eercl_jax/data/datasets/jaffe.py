"""JAFFE: 213 `.tiff` images named `<poser>.<code><n>.<id>.tiff` (e.g. `KA.AN1.39.tiff`), the
expression in the code: AN, DI, FE, HA, NE, SA, SU (docs/datasets.md#jaffe)."""
from __future__ import annotations

import os
import re

from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "jaffe"
SPLITS = ("all",)
SOURCE_SPLITS = TARGET_SPLITS = ("all",)
CODES = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "NE": "neutral",
         "SA": "sad", "SU": "surprise"}
_NAME = re.compile(r"([A-Za-z]{2})\.([A-Za-z]{2})(\d*)\.(\d+)\.tiff?", re.IGNORECASE)


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  del args
  if not os.path.isdir(src):
    raise DataError(f"{src}: JAFFE folder not found")
  items = []
  for root, dirs, names in os.walk(src):
    dirs[:] = sorted(d for d in dirs if not common.is_junk(d))
    for name in sorted(names):
      if common.is_junk(name) or not name.lower().endswith((".tiff", ".tif")):
        continue
      path = os.path.join(root, name)
      m = _NAME.fullmatch(name)
      if m is None:
        raise DataError(f"{path}: not a JAFFE file name '<poser>.<code><n>.<id>.tiff'")
      code = m.group(2).upper()
      if code not in CODES:
        raise DataError(f"{path}: unknown expression code {code!r} (known: {sorted(CODES)})")
      cls = ctx.resolve(CODES[code], path)
      if cls is not None:
        items.append(common.Item("all", path, cls, where=path))
  return items
