"""Golden tests: the strong view's ops against the original's stack (mmcls 0.x ops on mmcv 1.x).

The references below restate, call for call, what mmcv 1.x does for each op: OpenCV with mmcv's
flags, matrices (float32), border values, dtypes and rounding, on **BGR** arrays as the original
loads them (the project works on RGB; each reference converts in and out). Resizes use Pillow's
bilinear filter, the backend the original's configs select. Whole strong views are replayed from
the draws the project's generator made, so both sides see the same random numbers.

The float blends (Brightness, Contrast, Sharpness) are the exception: their `addWeighted` is
restated in numpy with the original's OpenCV arithmetic (double), because OpenCV 4.14 changed it,
and the `test_float_blends_match_the_original_opencv*` tests pin outputs taken from OpenCV 4.5.5.

The bar (per op, every magnitude the policy table can draw, both signs, on images with hard edges
up to the border): copy/lookup ops no pixel off by more than 1 grey level; interpolating and
blending ops at most 1% of pixels off by more than 1. Today's implementation is bit-exact, which
`test_every_op_is_bit_exact` pins.
"""
from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np
from PIL import Image
import pytest

from eercl_jax.data import transforms as T

FILL = (128, 128, 128)


# ------------------------------------------------------------------ test images (RGB, uint8)


def _edge_image(h: int, w: int, seed: int) -> np.ndarray:
  """Colour patches, a gradient, noise, one-pixel lines and distinct border rows/columns."""
  rng = np.random.default_rng(seed)
  img = np.zeros((h, w, 3), np.uint8)
  img[:, : w // 3] = (250, 10, 30)
  img[:, w // 3: 2 * w // 3] = (20, 200, 90)
  img[: h // 2, 2 * w // 3:] = np.linspace(0, 255, w - 2 * w // 3)[None, :, None]
  img[h // 2:, 2 * w // 3:] = rng.integers(0, 256, (h - h // 2, w - 2 * w // 3, 3))
  img[::11] = 255
  img[:, ::13] = 0
  img[0], img[-1], img[:, 0], img[:, -1] = 5, 240, 33, 199
  return img


IMAGES = {
    "edges_64x80": _edge_image(64, 80, 0),
    "edges_97x131": _edge_image(97, 131, 1),
    "noise_48x48": np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8),
    "flat_40x40": np.full((40, 40, 3), 5, np.uint8),  # flat areas: float blends' rounding
}


# ------------------------------------------------- mmcv 1.x, restated on BGR arrays with OpenCV


def _bgr(fn):
  """Runs a BGR reference on an RGB image."""
  def wrapped(rgb, *args):
    return np.ascontiguousarray(fn(np.ascontiguousarray(rgb[..., ::-1]), *args)[..., ::-1])
  return wrapped


def _bgr2gray(img):
  return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


@_bgr
def ref_shear(img, magnitude, direction):
  matrix = (np.float32([[1, magnitude, 0], [0, 1, 0]]) if direction == "horizontal"
            else np.float32([[1, 0, 0], [magnitude, 1, 0]]))
  h, w = img.shape[:2]
  return cv2.warpAffine(img, matrix, (w, h), borderValue=FILL, flags=cv2.INTER_CUBIC)


@_bgr
def ref_translate(img, magnitude, direction):
  h, w = img.shape[:2]
  offset = magnitude * (w if direction == "horizontal" else h)
  matrix = (np.float32([[1, 0, offset], [0, 1, 0]]) if direction == "horizontal"
            else np.float32([[1, 0, 0], [0, 1, offset]]))
  return cv2.warpAffine(img, matrix, (w, h), borderValue=FILL, flags=cv2.INTER_NEAREST)


@_bgr
def ref_rotate(img, angle):
  h, w = img.shape[:2]
  matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), -angle, 1.0)
  return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=FILL)


def _float_blend(img, degenerated, factor):
  # mmcv: cv2.addWeighted(img.astype(np.float32), factor, degenerated.astype(np.float32),
  # 1 - factor, 0), clip, astype. The original's OpenCV (4.5 to 4.13) does that sum in double and
  # rounds it once to float32; OpenCV 4.14 uses float32 multiply-adds instead, so the call itself
  # is no reference any more: its arithmetic is restated here.
  out = img.astype(np.float64) * factor + degenerated.astype(np.float64) * (1 - factor) + 0.0
  return np.clip(out.astype(np.float32), 0, 255).astype(img.dtype)


@_bgr
def ref_brightness(img, factor):
  return _float_blend(img, np.zeros_like(img), factor)


@_bgr
def ref_color(img, factor):
  gray = np.tile(_bgr2gray(img)[..., None], [1, 1, 3])
  return cv2.addWeighted(img, factor, gray, 1 - factor, 0)


@_bgr
def ref_contrast(img, factor):
  gray = _bgr2gray(img)
  hist = np.histogram(gray, 256, (0, 255))[0]
  mean = round(np.sum(gray) / np.sum(hist))
  degenerated = cv2.cvtColor((np.ones_like(img[..., 0]) * mean).astype(img.dtype),
                             cv2.COLOR_GRAY2BGR)
  return _float_blend(img, degenerated, factor)


@_bgr
def ref_sharpness(img, factor):
  kernel = np.array([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13
  return _float_blend(img, cv2.filter2D(img, -1, kernel), factor)


@_bgr
def ref_auto_contrast(img):
  def channel(im):
    histo = np.histogram(im, 256, (0, 255))[0]
    nonzero = np.nonzero(histo)[0]
    low, high = nonzero[0], nonzero[-1]
    if high <= low:
      return im
    scale = 255.0 / (high - low)
    lut = np.clip(np.arange(256) * scale - low * scale, 0, 255)
    return lut[im]
  return np.stack([channel(img[..., c]) for c in range(3)], -1).astype(img.dtype)


@_bgr
def ref_equalize(img):
  def channel(im):
    histo = np.histogram(im, 256, (0, 255))[0]
    nonzero = histo[histo > 0]
    step = (np.sum(nonzero) - nonzero[-1]) // 255
    if not step:
      return im
    lut = (np.cumsum(histo) + (step // 2)) // step
    lut = np.concatenate([[0], lut[:-1]], 0)
    lut[lut > 255] = 255
    return lut[im]
  return np.stack([channel(img[..., c]) for c in range(3)], -1).astype(img.dtype)


@_bgr
def ref_posterize(img, bits):
  shift = 8 - bits
  return np.left_shift(np.right_shift(img, shift), shift)


@_bgr
def ref_solarize(img, thr):
  return np.where(img < thr, img, 255 - img)


def ref_cutout(img, u_y, u_x, shape=16):
  """mmcv.cutout with np.random.uniform(size) = size + (1 - size) * u."""
  h, w = img.shape[:2]
  y0, x0 = h + (1.0 - h) * u_y, w + (1.0 - w) * u_x
  y1, x1 = int(max(0, y0 - shape / 2.)), int(max(0, x0 - shape / 2.))
  out = img.copy()
  out[y1:min(h, y1 + shape), x1:min(w, x1 + shape)] = FILL
  return out


def ref_pillow_resize(img, w, h):
  return np.array(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


# Policy name -> (reference on (rgb, magnitude after sign), pure copy/lookup op?).
REFERENCES = {
    "AutoContrast": (lambda img, m: ref_auto_contrast(img), True),
    "Brightness": (lambda img, m: ref_brightness(img, 1 + m), False),
    "ColorTransform": (lambda img, m: ref_color(img, 1 + m), False),
    "Contrast": (lambda img, m: ref_contrast(img, 1 + m), False),
    "Equalize": (lambda img, m: ref_equalize(img), True),
    "Identity": (lambda img, m: img, True),
    "Posterize": (lambda img, m: ref_posterize(img, math.ceil(m)), True),
    "Rotate": (ref_rotate, True),
    "Sharpness": (lambda img, m: ref_sharpness(img, 1 + m), False),
    "Shear_x": (lambda img, m: ref_shear(img, m, "horizontal"), False),
    "Shear_y": (lambda img, m: ref_shear(img, m, "vertical"), False),
    "Solarize": (ref_solarize, True),
    "Translate_x": (lambda img, m: ref_translate(img, m, "horizontal"), True),
    "Translate_y": (lambda img, m: ref_translate(img, m, "vertical"), True),
}


def _op_cases():
  """Every (policy, magnitude after sign) the table can draw: levels 1..10, both signs."""
  for policy in T.POLICIES:
    if policy.magnitude_range is None:
      yield policy, None
      continue
    for m in T.policy_magnitudes(policy.name):
      yield policy, m
      if policy.signed:
        yield policy, -m


def _ours(policy, img, m):
  return policy.op(img) if m is None else policy.op(img, policy.argument(m))


def _off(got, ref):
  """(largest difference, fraction of pixels off by more than one level)."""
  d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
  return int(d.max()), float((d > 1).mean())


def test_references_cover_the_policy_table():
  assert set(REFERENCES) == {p.name for p in T.POLICIES}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_each_op_meets_the_bar_at_every_magnitude_and_sign(name):
  img = IMAGES[name]
  failures = []
  for policy, m in _op_cases():
    ref_fn, pure = REFERENCES[policy.name]
    ref = ref_fn(img, m)
    got = _ours(policy, img, m)
    assert got.shape == ref.shape and got.dtype == np.uint8, policy.name
    worst, frac = _off(got, ref)
    if (pure and worst > 1) or (not pure and frac > 0.01):
      failures.append(f"{policy.name}({m}): max {worst}, {frac:.2%} off by > 1")
  assert not failures, failures


def test_every_op_is_bit_exact():
  for img in IMAGES.values():
    for policy, m in _op_cases():
      np.testing.assert_array_equal(_ours(policy, img, m), REFERENCES[policy.name][0](img, m),
                                    err_msg=f"{policy.name}({m})")


def _grey(h, w, level, pixel=None):
  """(h, w, 3) uint8 image of one grey level; `pixel` = ((y, x), level) sets one pixel apart."""
  img = np.full((h, w, 3), level, np.uint8)
  if pixel is not None:
    img[pixel[0]] = pixel[1]
  return img


# Magnitudes at levels 7 and 10 (Brightness, Contrast and Sharpness share the range).
_LEVEL7, _LEVEL10 = T.policy_magnitudes("Contrast")[6], T.policy_magnitudes("Contrast")[9]

# (policy, image, magnitude after sign, grey output) with the output mmcv 1.x's calls give under
# OpenCV 4.5.5 (opencv-python-headless 4.5.5.64; 4.6.0 gives the same). Under OpenCV 4.14 the same
# calls give the level in parentheses on some or all of those pixels (which ones depends on their
# position in the row): its float32 multiply-adds land at 58.999996 where the double sum rounds
# to exactly 59.
_ORIGINAL_OPENCV_BLENDS = [
    ("Brightness", _grey(3, 3, 25), +_LEVEL7, [[59] * 3] * 3),  # (58)
    ("Brightness", _grey(3, 3, 100), +_LEVEL7, [[236] * 3] * 3),  # (235)
    ("Contrast", _grey(3, 3, 162), -_LEVEL10, [[162] * 3] * 3),  # (161)
    # Mean luma 122.25 rounds to 122; the pixel 147 blends to 113 (112).
    ("Contrast", _grey(10, 10, 122, ((0, 0), 147)), -_LEVEL7,
     [[113] + [122] * 9] + [[122] * 10] * 9),
    ("Sharpness", _grey(3, 3, 162), -_LEVEL10, [[162] * 3] * 3),  # (161)
    # Centre 139 among 106s smooths to 119 and blends to 101 (100).
    ("Sharpness", _grey(3, 3, 106, ((1, 1), 139)), -_LEVEL10,
     [[125, 115, 125], [115, 101, 115], [125, 115, 125]]),
    # Centre 113 among 73s smooths to 88 and blends to 147 (146).
    ("Sharpness", _grey(3, 3, 73, ((1, 1), 113)), +_LEVEL7,
     [[56, 64, 56], [64, 147, 64], [56, 64, 56]]),
]


@pytest.mark.parametrize("case", range(len(_ORIGINAL_OPENCV_BLENDS)))
def test_float_blends_match_the_original_opencv(case):
  name, img, m, expected = _ORIGINAL_OPENCV_BLENDS[case]
  policy = next(p for p in T.POLICIES if p.name == name)
  expected = np.repeat(np.array(expected, np.uint8)[..., None], 3, axis=-1)
  np.testing.assert_array_equal(_ours(policy, img, m), expected)
  np.testing.assert_array_equal(REFERENCES[name][0](img, m), expected)  # the restated reference


# sha256 of the uint8 blends below under OpenCV 4.5.5 (4.13.0 gives the same; 4.14.0 does not:
# 8eb78bbd...), computed as mmcv does: addWeighted on float32 copies, np.clip, astype(np.uint8).
_ORIGINAL_OPENCV_ALL_PAIRS_SHA256 = (
    "64fb1db3a67f10509f567350169aec867cc4e04f189f1a52105eb9e087151f8f")


def test_float_blends_match_the_original_opencv_at_every_pixel_pair():
  # Every (pixel, degenerate) pair of uint8 levels at every factor the table draws. A blend's
  # output depends on nothing else, so this covers Brightness, Contrast and Sharpness entirely.
  a = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)
  b = np.ascontiguousarray(a.T)
  digest = hashlib.sha256()
  for m in T.policy_magnitudes("Sharpness"):
    for factor in (1 + m, 1 - m):
      out = T._float_blend(a, b, factor)
      np.testing.assert_array_equal(out, _float_blend(a, b, factor))
      digest.update(out.tobytes())
  assert digest.hexdigest() == _ORIGINAL_OPENCV_ALL_PAIRS_SHA256


@pytest.mark.parametrize("kind", ["flat", "edges"])
def test_sharpness_rounding_in_flat_areas(kind):
  # The original's addWeighted (a double sum) gives exactly 5 on a flat 5 where a float32
  # multiply-add gives 4.9999995 and truncates to 4: the case that separates the two.
  img = IMAGES["flat_40x40"] if kind == "flat" else IMAGES["edges_64x80"]
  for factor in (1.28, 2.9, -0.9):
    np.testing.assert_array_equal(T.sharpness(img, factor), ref_sharpness(img, factor))


def test_color_rounds_like_opencv():
  img = np.zeros((1, 1, 3), np.uint8)
  img[0, 0] = (128, 128, 128)
  img = np.repeat(np.repeat(img, 4, 0), 4, 1)
  img[..., 1:] = 0  # grey level 38 of pure red 128 (OpenCV fixed point)
  for factor in (1.28, 2.9, -0.9, 0.1):
    np.testing.assert_array_equal(T.color(img, factor), ref_color(img, factor))
  # The worked case: 128 * 1.28 + 15 * (-0.28) = 159.64 rounds to 160.
  pixel = np.array([[[128, 15, 15]]], np.uint8)
  grey = int(_bgr2gray(np.ascontiguousarray(pixel[..., ::-1]))[0, 0])
  expected = int(np.clip(np.rint(128 * 1.28 + grey * (1 - 1.28)), 0, 255))
  assert int(T.color(pixel, 1.28)[0, 0, 0]) == expected


def test_shear_fills_with_128_and_interpolates_bicubically():
  img = IMAGES["edges_64x80"]
  out = T.shear_x(img, 0.3)
  # The bottom-left corner maps from x = -0.3 * 63 (outside): the border value 128.
  np.testing.assert_array_equal(out[-1, 0], FILL)
  # Taps outside the image read the border value 128, not a repeated edge pixel.
  np.testing.assert_array_equal(out, ref_shear(img, 0.3, "horizontal"))


@pytest.mark.parametrize("size", [(48, 48), (97, 131)])
def test_cutout_centre_is_drawn_in_1_to_size(size):
  img = _edge_image(*size, seed=3)
  for seed in range(40):
    rng = np.random.default_rng(seed)
    got = T.cutout(img, rng, size=16, prob=1.0)
    replay = np.random.default_rng(seed)
    replay.random()  # the prob draw
    np.testing.assert_array_equal(got, ref_cutout(img, replay.random(), replay.random()))
  # u -> 0 puts the centre at (size, size): the box is cut by the bottom-right border.
  class Zero:
    def random(self):
      return 0.0
  out = T.cutout(img, Zero(), size=16, prob=1.0)
  h, w = size
  assert (out[h - 8:, w - 8:] == 128).all() and (out[: h - 8] == img[: h - 8]).all()


# ------------------------------------------------------- whole strong views, replayed draws


class Recorder:
  """Wraps a Generator and records each draw, so a reference can replay them."""

  def __init__(self, seed):
    self._rng = np.random.default_rng(seed)
    self.log = []

  def random(self):
    v = self._rng.random()
    self.log.append(("random", v))
    return v

  def uniform(self, low, high):
    v = self._rng.uniform(low, high)
    self.log.append(("uniform", v))
    return v

  def integers(self, low, high=None, size=None):
    v = self._rng.integers(low, high, size=size)
    self.log.append(("integers", v))
    return v


class Replay:
  def __init__(self, log):
    self._log = list(log)

  def take(self, kind):
    got, v = self._log.pop(0)
    assert got == kind, f"the reference expected a {kind} draw, the view made a {got} draw"
    return v

  def done(self):
    assert not self._log, f"{len(self._log)} draws left unused"


def ref_random_resized_crop(img, draws: Replay, size=224, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)):
  """mmcls 0.x RandomResizedCrop (get_params, imcrop, imresize with the Pillow backend)."""
  height, width = img.shape[:2]
  area = height * width
  for _ in range(10):
    target_area = draws.take("uniform") * area
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect_ratio = math.exp(draws.take("uniform"))
    assert log_ratio[0] <= math.log(aspect_ratio) <= log_ratio[1]
    tw = int(round(math.sqrt(target_area * aspect_ratio)))
    th = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < tw <= width and 0 < th <= height:
      oy, ox = int(draws.take("integers")), int(draws.take("integers"))
      assert 0 <= oy <= height - th and 0 <= ox <= width - tw
      break
  else:
    in_ratio = width / height
    if in_ratio < min(ratio):
      tw, th = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
      th, tw = height, int(round(height * max(ratio)))
    else:
      tw, th = width, height
    oy, ox = (height - th) // 2, (width - tw) // 2
  bbox = np.array([ox, oy, ox + tw - 1, oy + th - 1])  # mmcv.imcrop's inclusive box
  patch = img[bbox[1]:bbox[3] + 1, bbox[0]:bbox[2] + 1]
  return ref_pillow_resize(np.ascontiguousarray(patch), size, size)


def ref_strong_view(img, log, size=224):
  draws = Replay(log)
  out = ref_random_resized_crop(img, draws, size)
  if draws.take("random") < 0.5:  # RandomFlip(0.5)
    out = np.ascontiguousarray(out[:, ::-1])
  # RandRangeAug: two policies with replacement, a level each, then the mmcls op's own draws.
  for index in draws.take("integers"):
    policy = T.POLICIES[int(index)]
    ref_fn = REFERENCES[policy.name][0]
    m = None
    if policy.magnitude_range is not None:
      lo, hi = policy.magnitude_range
      m = int(draws.take("integers")) / 10 * (hi - lo) + lo
    if draws.take("random") > policy.prob:
      continue
    if policy.signed and draws.take("random") < 0.5:
      m = -m
    out = ref_fn(out, m)
  if draws.take("random") <= 0.5:  # Cutout(16, prob 0.5)
    out = ref_cutout(out, draws.take("random"), draws.take("random"))
  draws.done()
  return out


def _scripted_seeds(img, want=("Shear_x", "Shear_y", "ColorTransform", "Sharpness", "Rotate")):
  """Seeds whose strong view fires each op in `want` at least once (found by replaying)."""
  seeds, missing = [], set(want)
  for seed in range(400):
    rec = Recorder(seed)
    T.strong_view(img, rec, crop=32)
    names = {T.POLICIES[int(i)].name for kind, v in rec.log if kind == "integers"
             and np.ndim(v) == 1 for i in v}
    hit = names & missing
    if hit:
      seeds.append(seed)
      missing -= hit
    if not missing and len(seeds) >= 3:
      break
  return seeds


@pytest.mark.parametrize("name", ["edges_97x131", "noise_48x48"])
def test_whole_strong_views_replayed_from_the_same_draws(name):
  img = IMAGES[name]
  seeds = _scripted_seeds(img)
  assert len(seeds) >= 3
  for seed in seeds + [1000, 1001]:
    rec = Recorder(seed)
    got = T.strong_view(img, rec, crop=32)
    np.testing.assert_array_equal(got, ref_strong_view(img, rec.log, size=32),
                                  err_msg=f"seed {seed}")


def test_weak_and_test_views_match_the_pillow_resize_pipeline():
  img = IMAGES["edges_97x131"]
  resized = ref_pillow_resize(img, 40, 40)
  np.testing.assert_array_equal(T.test_view(img, resize=40, crop=32), resized[4:36, 4:36])
  rec = Recorder(5)
  got = T.weak_view(img, rec, resize=40, crop=32)
  draws = Replay(rec.log)
  flipped = resized[:, ::-1] if draws.take("random") < 0.5 else resized
  y, x = draws.take("integers")
  np.testing.assert_array_equal(got, flipped[y:y + 32, x:x + 32])
