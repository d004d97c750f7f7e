"""Image files: which names are images, finding them under folders, decoding one, and checking
many before a run starts.

Decoding is the one place pixels enter the program (the lists, the packed sets, `predict` and
the data-set list builders all call `load_image`), so every caller sees the same RGB conversion,
16-bit scaling and EXIF orientation.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from eercl_jax.errors import DataError

# Every extension Pillow decodes that FER data sets ship (FER2013 as PNG, JAFFE as TIFF, ...).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
CHECK_MODES = ("decode", "exists", "none")

# Pillow's modes of 16-bit (and 32-bit integer) greyscale images; "I" is how Pillow opens many
# 16-bit PNGs. Their values are scaled to 8 bits (Pillow's own convert would clip them to 255).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def is_image_name(name: str) -> bool:
  """An image file name by its extension (case-insensitive); hidden files are not images."""
  base = os.path.basename(name)
  return base.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith(".")


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 (H, W, 3) RGB; grey/RGBA/CMYK/palette become RGB, 16-bit
  greyscale is scaled to 8 bits (v / 257, rounded), float images are refused."""
  try:
    with Image.open(path) as im:
      return pil_to_rgb(im)
  except Exception as e:
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def pil_to_rgb(im: Image.Image) -> np.ndarray:
  """A Pillow image as uint8 (H, W, 3) RGB, the conversion of `load_image` (ValueError for a
  floating-point or out-of-range 16-bit image)."""
  # OpenCV's imread (the original's loader) honours the EXIF orientation; Pillow does not.
  im = ImageOps.exif_transpose(im)
  if im.mode in _WIDE_INT_MODES:
    wide = np.asarray(im).astype(np.float64)
    if wide.min() < 0 or wide.max() > 65535:
      raise ValueError(f"{im.mode} image with values outside 0..65535")
    grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if im.mode == "F":
    raise ValueError("floating-point image: its value range is unknown, convert it to 8 or "
                     "16 bits")
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


def as_rgb(item, name: str) -> np.ndarray:
  """One image given in memory or by file as uint8 (H, W, 3) RGB: a Pillow image (converted as
  `load_image` converts a file), a uint8 array (H, W) or (H, W, 1) (greyscale: repeated),
  (H, W, 3) (RGB) or (H, W, 4) (RGBA: alpha dropped, as Pillow's convert), or a file path.
  Anything else is a DataError naming the image (`name`)."""
  if isinstance(item, (str, os.PathLike)):
    return load_image(os.fspath(item))
  if isinstance(item, Image.Image):
    try:
      return pil_to_rgb(item)
    except (ValueError, OSError) as e:
      raise DataError(f"{name}: cannot convert the image to RGB ({e})") from e
  if not isinstance(item, np.ndarray) and not hasattr(item, "__array__"):
    raise DataError(f"{name}: expected a PIL image, a uint8 array or a file path, got "
                    f"{type(item).__name__}")
  arr = np.asarray(item)
  if arr.dtype != np.uint8:
    raise DataError(f"{name}: expected uint8 pixels (0..255), got a {arr.dtype} array; "
                    "convert it (e.g. np.clip(x, 0, 255).astype(np.uint8))")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  elif arr.ndim == 3 and arr.shape[-1] == 4:
    arr = arr[..., :3]
  if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
    raise DataError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got "
                    f"shape {np.shape(item)}")
  return np.ascontiguousarray(arr)


def image_problem(path: str, check: str) -> str | None:
  """Why `path` cannot be used as an image, or None if it can (as far as `check` looks).
  'decode' decodes the whole image with `load_image` (PIL's verify() does not read the scan
  data, so a truncated JPEG would pass it and fail mid-run)."""
  if check == "none":
    return None
  if not os.path.isfile(path):
    return "missing image"
  if check == "decode":
    try:
      load_image(path)
    except Exception as e:  # pylint: disable=broad-except  (any decode failure: unusable)
      cause = e.__cause__ or e
      return f"unreadable image ({type(cause).__name__}: {cause})"
  return None


def check_images(paths: Sequence[str], check: str) -> list[str | None]:
  """`image_problem` of every path; decoding runs on threads (Pillow releases the GIL)."""
  if check not in CHECK_MODES:
    raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
  if check != "decode" or len(paths) < 64:
    return [image_problem(p, check) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    return list(pool.map(lambda p: image_problem(p, check), paths, chunksize=32))


def find_images(inputs: Sequence[str]) -> list[str]:
  """Image files of `inputs` (files and folders, folders recursively), in the given order,
  each folder's images sorted; duplicates kept once. A named file that is not an image, a
  missing input or a folder without images is a DataError naming it."""
  if not inputs:
    raise DataError("no images or folders given")
  out, seen = [], set()
  for item in inputs:
    if os.path.isdir(item):
      found = []
      for root, dirs, files in os.walk(item):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if is_image_name(f)]
      if not found:
        raise DataError(f"{item}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    elif os.path.isfile(item):
      if not is_image_name(item):
        raise DataError(f"{item}: not an image file (expected one of "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
      found = [item]
    else:
      raise DataError(f"{item}: no such file or folder")
    for path in found:
      key = os.path.abspath(path)
      if key not in seen:
        seen.add(key)
        out.append(path)
  return out
