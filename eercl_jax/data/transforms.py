"""Image views of the original's mmcls 0.x pipelines (docs/method.md#source-data-views), on uint8
HxWx3 RGB arrays.

All randomness comes from an explicit `np.random.Generator`, so a view is a pure function of the
generator's seed (the pipelines derive it from (seed, epoch, index)). Normalisation is not done
here: pipelines ship uint8 (4x less host->device traffic) and the train step calls `normalize`.

Geometric ops follow OpenCV's conventions as mmcv uses them (forward affine matrices on pixel-index
coordinates, positive rotation = clockwise on screen) and are executed with Pillow; `_warp_affine`
is the one place that translates between the two coordinate conventions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from eercl_jax.data.lists import DataError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the 0..255 scale (the original's Normalize)
IMAGENET_STD = (58.395, 57.12, 57.375)
FILL = 128  # mmcls pad value for geometric ops and Cutout
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # = OpenCV's BGR2GRAY on RGB input


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """(x - mean) / std over the last axis, float32; works on numpy and jax arrays alike."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x.astype(np.float32) - mean) / std


# Pillow's modes of 16-bit (and 32-bit integer) greyscale images; "I" is how Pillow opens many
# 16-bit PNGs. Their values are scaled to 8 bits (Pillow's own convert would clip them to 255).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 (H, W, 3) RGB; grey/RGBA/CMYK/palette become RGB, 16-bit
  greyscale is scaled to 8 bits (v / 257, rounded), float images are refused."""
  try:
    with Image.open(path) as im:
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
  except Exception as e:
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  if img.shape[:2] == (height, width):
    return img
  return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def _hflip(img: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
  return img[:, ::-1] if rng.random() < prob else img


# ------------------------------------------------------------------------------------- views


def weak_view(img: np.ndarray, rng: np.random.Generator, resize: int = 256,
              crop: int = 224) -> np.ndarray:
  """Square resize -> horizontal flip (p=0.5) -> random crop (uniform offset, no padding)."""
  img = _hflip(_resize(img, resize, resize), rng)
  y, x = rng.integers(0, resize - crop + 1, size=2)
  return np.ascontiguousarray(img[y:y + crop, x:x + crop])


def test_view(img: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
  """Square resize -> centre crop."""
  img = _resize(img, resize, resize)
  o = (resize - crop) // 2
  return np.ascontiguousarray(img[o:o + crop, o:o + crop])


def strong_view(img: np.ndarray, rng: np.random.Generator, crop: int = 224) -> np.ndarray:
  """RandomResizedCrop on the original-size image -> flip -> RandRangeAug -> Cutout(16)."""
  img = _hflip(random_resized_crop(img, rng, crop), rng)
  img = rand_range_aug(img, rng)
  return cutout(img, rng)


def random_resized_crop(img: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
  """mmcls/torchvision RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio."""
  height, width = img.shape[:2]
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      y = int(rng.integers(0, height - h + 1))
      x = int(rng.integers(0, width - w + 1))
      break
  else:
    # Fallback: the largest central crop whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
      w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
      w, h = int(round(height * max(ratio))), height
    else:
      w, h = width, height
    y, x = (height - h) // 2, (width - w) // 2
  return _resize(np.ascontiguousarray(img[y:y + h, x:x + w]), size, size)


def cutout(img: np.ndarray, rng: np.random.Generator, size: int = 16, prob: float = 0.5,
           fill: int = FILL) -> np.ndarray:
  """mmcv cutout: centre uniform in the image; the box's top-left is clamped at 0 *before*
  adding `size`, so boxes at the top/left border keep their full size, at the bottom/right
  they are cut by the border."""
  if rng.random() > prob:
    return img
  height, width = img.shape[:2]
  cy, cx = rng.uniform(0, height), rng.uniform(0, width)
  y1, x1 = int(max(0.0, cy - size / 2)), int(max(0.0, cx - size / 2))
  out = img.copy()
  out[y1:min(height, y1 + size), x1:min(width, x1 + size)] = fill
  return out


# ------------------------------------------------------------------------ RandRangeAug ops
# Colour ops blend with a "degenerate" image: clip(degenerate*(1-f) + img*f), truncated to
# uint8 as mmcv's float path does. f = 1 + magnitude may be <= 0 (see policies below).


def _blend(img: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
  out = img.astype(np.float32) * factor + degenerate.astype(np.float32) * (1.0 - factor)
  return np.clip(out, 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
  """uint8 (H, W) luma, rounded like OpenCV's cvtColor."""
  return np.rint(img.astype(np.float32) @ _GRAY_WEIGHTS).clip(0, 255).astype(np.uint8)


def auto_contrast(img: np.ndarray) -> np.ndarray:
  """Stretches each channel's [min, max] to [0, 255]; constant channels are left alone."""
  out = img.copy()
  for c in range(img.shape[-1]):
    lo, hi = int(img[..., c].min()), int(img[..., c].max())
    if lo < hi:
      scale = 255.0 / (hi - lo)
      lut = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)
      out[..., c] = lut[img[..., c]]
  return out


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
  return _blend(img, np.zeros_like(img), factor)


def color(img: np.ndarray, factor: float) -> np.ndarray:
  return _blend(img, _gray(img)[..., None], factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
  mean = round(float(_gray(img).mean()))
  return _blend(img, np.full_like(img, mean), factor)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel; borders reflected as OpenCV's
  filter2D does, so unlike PIL the border pixels are smoothed too)."""
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
  padded = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = img.shape[:2]
  smooth = sum(kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
               for dy in range(3) for dx in range(3))
  return _blend(img, np.rint(smooth).clip(0, 255).astype(np.uint8), factor)


def equalize(img: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation with Pillow's (and mmcv's) lookup-table rule."""
  out = img.copy()
  for c in range(img.shape[-1]):
    hist = np.bincount(img[..., c].ravel(), minlength=256)
    used = hist[hist > 0]
    step = (used.sum() - used[-1]) // 255
    if step:
      below = np.cumsum(hist) - hist  # pixels strictly darker than each level
      lut = np.minimum((below + step // 2) // step, 255).astype(np.uint8)
      out[..., c] = lut[img[..., c]]
  return out


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
  shift = 8 - int(bits)
  return (img >> shift) << shift


def solarize(img: np.ndarray, threshold: float) -> np.ndarray:
  return np.where(img < threshold, img, 255 - img).astype(np.uint8)


def _warp_affine(img: np.ndarray, matrix: np.ndarray, resample: Image.Resampling) -> np.ndarray:
  """Applies a forward 2x3 affine `matrix` (OpenCV's warpAffine convention: dst(M p) = src(p),
  p in pixel-index coordinates) with Pillow, filling uncovered pixels with FILL."""
  lin, t = matrix[:, :2], matrix[:, 2]
  inv = np.linalg.inv(lin)
  # Pillow samples at pixel centres p + 0.5 and wants the output->input map.
  half = np.array([0.5, 0.5])
  offset = half - inv @ (half + t)
  data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
  h, w = img.shape[:2]
  out = Image.fromarray(img).transform((w, h), Image.Transform.AFFINE, data, resample=resample,
                                       fillcolor=(FILL,) * img.shape[-1])
  return np.asarray(out)


def rotate(img: np.ndarray, angle: float) -> np.ndarray:
  """Rotates by `angle` degrees about the centre, positive = clockwise on screen (mmcv)."""
  h, w = img.shape[:2]
  cx, cy = (w - 1) / 2, (h - 1) / 2
  a = math.radians(angle)
  # y points down, so this rotation matrix turns the picture clockwise for a > 0.
  lin = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
  t = np.array([cx, cy]) - lin @ np.array([cx, cy])
  return _warp_affine(img, np.column_stack([lin, t]), Image.Resampling.NEAREST)


def shear_x(img: np.ndarray, magnitude: float) -> np.ndarray:
  """x' = x + magnitude * y (origin top-left), bicubic."""
  return _warp_affine(img, np.array([[1, magnitude, 0], [0, 1, 0]], float),
                      Image.Resampling.BICUBIC)


def shear_y(img: np.ndarray, magnitude: float) -> np.ndarray:
  """y' = y + magnitude * x (origin top-left), bicubic."""
  return _warp_affine(img, np.array([[1, 0, 0], [magnitude, 1, 0]], float),
                      Image.Resampling.BICUBIC)


def translate_x(img: np.ndarray, fraction: float) -> np.ndarray:
  """Shifts right by fraction * width pixels (negative: left), nearest."""
  offset = fraction * img.shape[1]
  return _warp_affine(img, np.array([[1, 0, offset], [0, 1, 0]], float),
                      Image.Resampling.NEAREST)


def translate_y(img: np.ndarray, fraction: float) -> np.ndarray:
  """Shifts down by fraction * height pixels (negative: up), nearest."""
  offset = fraction * img.shape[0]
  return _warp_affine(img, np.array([[1, 0, 0], [0, 1, offset]], float),
                      Image.Resampling.NEAREST)


# ------------------------------------------------------------------------------ RandRangeAug


def _enhance_factor(magnitude: float) -> float:
  # mmcls 0.x: factor = 1 + magnitude after the random sign, so the table's [0.1, 1.9]
  # "enhancement" range gives factors in [-0.9, 2.9]; kept because the released code does this.
  return 1.0 + magnitude


def _posterize_bits(magnitude: float) -> int:
  return math.ceil(magnitude)  # mmcls Posterize rounds bits up


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  op: Callable[..., np.ndarray]            # op(img) or op(img, argument)
  magnitude_range: Optional[tuple[float, float]] = None
  prob: float = 0.5                        # chance the op fires once chosen
  signed: bool = False                     # negate the magnitude with p = 0.5
  argument: Callable[[float], float] = float  # magnitude -> op argument


_ENHANCE = dict(magnitude_range=(0.1, 1.9), signed=True, argument=_enhance_factor)
POLICIES: tuple[Policy, ...] = (
    Policy("AutoContrast", auto_contrast),
    Policy("Brightness", brightness, **_ENHANCE),
    Policy("ColorTransform", color, **_ENHANCE),
    Policy("Contrast", contrast, **_ENHANCE),
    Policy("Equalize", equalize),
    Policy("Identity", lambda img: img, prob=1.0),
    Policy("Posterize", posterize, magnitude_range=(4, 8), argument=_posterize_bits),
    Policy("Rotate", rotate, magnitude_range=(-30, 30), signed=True),
    Policy("Sharpness", sharpness, **_ENHANCE),
    Policy("Shear_x", shear_x, magnitude_range=(0, 0.3), signed=True),
    Policy("Shear_y", shear_y, magnitude_range=(0, 0.3), signed=True),
    Policy("Solarize", solarize, magnitude_range=(0, 256)),
    Policy("Translate_x", translate_x, magnitude_range=(-0.3, 0.3), signed=True),
    Policy("Translate_y", translate_y, magnitude_range=(-0.3, 0.3), signed=True),
)
_BY_NAME = {p.name: p for p in POLICIES}


def _magnitude(policy: Policy, level: int, total_level: float) -> float:
  lo, hi = policy.magnitude_range
  return level / total_level * (hi - lo) + lo


def policy_magnitudes(name: str, magnitude_level: int = 10, total_level: float = 10) -> list:
  """The magnitude of policy `name` at levels 1..magnitude_level (before sign and conversion)."""
  policy = _BY_NAME[name]
  return [_magnitude(policy, level, total_level) for level in range(1, magnitude_level + 1)]


def apply_policy(policy: Policy, img: np.ndarray, rng: np.random.Generator,
                 magnitude: Optional[float] = None) -> np.ndarray:
  """One mmcls op: fires with its probability, then takes a random sign if it is signed."""
  if rng.random() > policy.prob:
    return img
  if magnitude is None:
    return policy.op(img)
  if policy.signed and rng.random() < 0.5:
    magnitude = -magnitude
  return policy.op(img, policy.argument(magnitude))


def rand_range_aug(img: np.ndarray, rng: np.random.Generator, num_policies: int = 2,
                   magnitude_level: int = 10, total_level: float = 10) -> np.ndarray:
  """The original's RandRangeAug: `num_policies` policies drawn with replacement, each with its
  own uniform integer level in 1..magnitude_level."""
  for i in rng.integers(0, len(POLICIES), size=num_policies):
    policy = POLICIES[i]
    magnitude = None
    if policy.magnitude_range is not None:
      magnitude = _magnitude(policy, int(rng.integers(1, magnitude_level + 1)), total_level)
    img = apply_policy(policy, img, rng, magnitude)
  return img
