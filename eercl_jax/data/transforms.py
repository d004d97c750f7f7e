"""Image views of the original's mmcls 0.x pipelines (docs/method.md#source-data-views), on uint8
HxWx3 RGB arrays.

All randomness comes from an explicit `np.random.Generator`, so a view is a pure function of the
generator's seed (the pipelines derive it from (seed, epoch, index)). Normalisation is not done
here: pipelines ship uint8 (4x less host->device traffic) and the train step calls `normalize`.

The RandRangeAug ops call OpenCV exactly as mmcv 1.x does (the original's stack), except the
float blends, which restate the original's OpenCV arithmetic in numpy; the resizes use Pillow's
bilinear filter, as the original's configs select mmcv's Pillow backend for them
(docs/method.md#strong-view-ops-pixel-for-pixel).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image

FILL = 128  # mmcls pad value for geometric ops and Cutout


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pillow bilinear resize to (height, width), the original's backend; a no-op at that size."""
  if img.shape[:2] == (height, width):
    return img
  return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def _hflip(img: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
  return img[:, ::-1] if rng.random() < prob else img


# ------------------------------------------------------------------------------------- views


def weak_view(img: np.ndarray, rng: np.random.Generator, resize: int = 256,
              crop: int = 224) -> np.ndarray:
  """Square resize -> horizontal flip (p=0.5) -> random crop (uniform offset, no padding)."""
  img = _hflip(resize_bilinear(img, resize, resize), rng)
  y, x = rng.integers(0, resize - crop + 1, size=2)
  return np.ascontiguousarray(img[y:y + crop, x:x + crop])


def test_view(img: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
  """Square resize -> centre crop."""
  img = resize_bilinear(img, resize, resize)
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
  return resize_bilinear(np.ascontiguousarray(img[y:y + h, x:x + w]), size, size)


def cutout(img: np.ndarray, rng: np.random.Generator, size: int = 16, prob: float = 0.5,
           fill: int = FILL) -> np.ndarray:
  """mmcv cutout: the box's top-left is clamped at 0 *before* adding `size`, so boxes at the
  top/left border keep their full size, at the bottom/right they are cut by the border."""
  if rng.random() > prob:
    return img
  height, width = img.shape[:2]
  # mmcv draws np.random.uniform(size), i.e. low=size, high=1: centres in (1, size], not
  # [0, size) (docs/method.md#strong-view-ops-pixel-for-pixel). numpy's uniform is
  # low + (high - low) * u; Generator.uniform refuses high < low, so it is written out.
  cy = height + (1.0 - height) * rng.random()
  cx = width + (1.0 - width) * rng.random()
  y1, x1 = int(max(0.0, cy - size / 2)), int(max(0.0, cx - size / 2))
  out = img.copy()
  out[y1:min(height, y1 + size), x1:min(width, x1 + size)] = fill
  return out


# ------------------------------------------------------------------------ RandRangeAug ops
# Each op makes the OpenCV calls mmcv 1.x makes for it, with the same flags, border values and
# dtypes (docs/method.md#strong-view-ops-pixel-for-pixel), so rounding, interpolation and borders
# are the original's; the float addWeighted is restated in numpy (`_float_blend`). mmcv works on
# BGR arrays, these on RGB: every call below is blind to the channel order except the luma, which
# uses RGB2GRAY on RGB (= BGR2GRAY on BGR, same weights).
# Colour factors are f = 1 + magnitude and may be <= 0 (see the policies below).


_BLEND_BLOCK = 8192  # elements per block: 64 KiB float64 buffers, reused from the heap


def _float_blend(img: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
  """mmcv's float path: addWeighted on float32 copies, clip, truncate back to uint8.

  Restated in numpy rather than called. The OpenCV of the original's time (4.5 to 4.13; 4.5.5,
  4.6, 4.9, 4.11 and 4.13 checked) computes a float32 addWeighted in double and rounds once to
  float32: `float32(img * factor + degenerate * (1 - factor))`. OpenCV 4.14 uses float32
  multiply-adds, which land a hair below an integer (161.99998 for 162) and truncate one grey
  level lower. This computes in double whatever OpenCV is installed. (An old OpenCV on a CPU
  with FMA fuses its double multiply-adds: that moves a few float32 results by one ulp, never a
  uint8 one, at any pixel pair and factor of the table.)
  Worked through in blocks: whole-image float64 temporaries are mapped afresh on every call and
  cost more in page faults than the arithmetic itself.
  """
  a = np.ascontiguousarray(img).reshape(-1)
  b = np.ascontiguousarray(degenerate).reshape(-1)
  out = np.empty(a.shape, np.uint8)
  for start in range(0, a.size, _BLEND_BLOCK):
    block = slice(start, start + _BLEND_BLOCK)
    x = a[block].astype(np.float64)
    x *= factor
    x += b[block].astype(np.float64) * (1 - factor)
    y = x.astype(np.float32)
    np.clip(y, 0, 255, out=y)
    out[block] = y  # truncates, as astype(uint8)
  return out.reshape(img.shape)


_LEVELS = np.arange(256, dtype=np.uint8)


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Applies a (256,) or per-channel (C, 256) uint8 table. Point ops whose output depends on the
  pixel value alone are exact as a table, and a table lookup is ~10x cheaper than the arithmetic
  over every pixel."""
  table = np.asarray(table, np.uint8)
  if table.ndim == 2:
    table = np.ascontiguousarray(table.T)[None]  # (1, 256, C): one table per channel
  return cv2.LUT(np.ascontiguousarray(img), table)


def _constant_blend(img: np.ndarray, value: int, factor: float) -> np.ndarray:
  """`_float_blend` against a constant image, evaluated once per grey level into a table."""
  table = _float_blend(_LEVELS[None], np.full((1, 256), value, np.uint8), factor)[0]
  return _lut(img, table)


def _gray(img: np.ndarray) -> np.ndarray:
  """uint8 (H, W) luma with OpenCV's fixed-point weights."""
  return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def auto_contrast(img: np.ndarray) -> np.ndarray:
  """Stretches each channel's [min, max] to [0, 255]; constant channels are left alone."""
  tables = []
  for c in range(img.shape[-1]):
    lo, hi = int(img[..., c].min()), int(img[..., c].max())
    table = _LEVELS
    if lo < hi:
      scale = 255.0 / (hi - lo)
      table = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)
    tables.append(table)
  return _lut(img, np.stack(tables))


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
  return _constant_blend(img, 0, factor)


def color(img: np.ndarray, factor: float) -> np.ndarray:
  """mmcv adjust_color: a uint8 addWeighted (rounds and saturates), unlike the other blends."""
  img = np.ascontiguousarray(img)
  gray = np.repeat(_gray(img)[..., None], 3, axis=-1)
  return cv2.addWeighted(img, factor, gray, 1 - factor, 0)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
  gray = _gray(img)
  mean = round(int(gray.sum(dtype=np.int64)) / gray.size)  # Python's round, as mmcv
  return _constant_blend(img, mean, factor)


_SMOOTH = np.array([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13  # PIL's SMOOTH kernel


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  """Blend with filter2D's uint8 smoothing (borders reflected, 101)."""
  img = np.ascontiguousarray(img)
  return _float_blend(img, cv2.filter2D(img, -1, _SMOOTH), factor)


def equalize(img: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation with Pillow's (and mmcv's) lookup-table rule."""
  tables = []
  for c in range(img.shape[-1]):
    hist = np.bincount(img[..., c].ravel(), minlength=256)
    used = hist[hist > 0]
    step = (used.sum() - used[-1]) // 255
    table = _LEVELS
    if step:
      below = np.cumsum(hist) - hist  # pixels strictly darker than each level
      table = np.minimum((below + step // 2) // step, 255).astype(np.uint8)
    tables.append(table)
  return _lut(img, np.stack(tables))


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
  shift = 8 - int(bits)
  return _lut(img, (_LEVELS >> shift) << shift)


def solarize(img: np.ndarray, threshold: float) -> np.ndarray:
  return _lut(img, np.where(_LEVELS < threshold, _LEVELS, 255 - _LEVELS))


def _warp_affine(img: np.ndarray, matrix, interpolation: int) -> np.ndarray:
  """OpenCV's warpAffine with a forward 2x3 `matrix` (dst(M p) = src(p), pixel indices); taps
  outside the image read the constant FILL, as mmcv's border_value."""
  h, w = img.shape[:2]
  return cv2.warpAffine(img, matrix, (w, h), flags=interpolation,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL,) * 3)


def rotate(img: np.ndarray, angle: float) -> np.ndarray:
  """Rotates by `angle` degrees about the centre, positive = clockwise on screen (mmcv), nearest."""
  h, w = img.shape[:2]
  # OpenCV's positive angle is counter-clockwise; mmcv negates it.
  matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), -angle, 1.0)
  return _warp_affine(img, matrix, cv2.INTER_NEAREST)


# mmcv builds the shear and translation matrices in float32; kept, as it moves sample positions.
def shear_x(img: np.ndarray, magnitude: float) -> np.ndarray:
  """x' = x + magnitude * y (origin top-left), bicubic."""
  return _warp_affine(img, np.float32([[1, magnitude, 0], [0, 1, 0]]), cv2.INTER_CUBIC)


def shear_y(img: np.ndarray, magnitude: float) -> np.ndarray:
  """y' = y + magnitude * x (origin top-left), bicubic."""
  return _warp_affine(img, np.float32([[1, 0, 0], [magnitude, 1, 0]]), cv2.INTER_CUBIC)


def translate_x(img: np.ndarray, fraction: float) -> np.ndarray:
  """Shifts right by fraction * width pixels (negative: left), nearest."""
  offset = fraction * img.shape[1]
  return _warp_affine(img, np.float32([[1, 0, offset], [0, 1, 0]]), cv2.INTER_NEAREST)


def translate_y(img: np.ndarray, fraction: float) -> np.ndarray:
  """Shifts down by fraction * height pixels (negative: up), nearest."""
  offset = fraction * img.shape[0]
  return _warp_affine(img, np.float32([[1, 0, 0], [0, 1, offset]]), cv2.INTER_NEAREST)


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
