"""Views and RandRangeAug ops: shapes, determinism, the RandRangeAug table of docs/method.md, a
few ops by hand."""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from eercl_jax.data import images, lists, transforms as T
from eercl_jax.errors import DataError


def _img(h=40, w=56, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "CMYK", "P"])
def test_load_image_always_rgb(tmp_path, mode):
  path = str(tmp_path / f"x_{mode}.{'jpg' if mode in ('L', 'RGB', 'CMYK') else 'png'}")
  Image.new(mode, (9, 7)).save(path)
  img = images.load_image(path)
  assert img.shape == (7, 9, 3) and img.dtype == np.uint8


def test_load_grey_replicates_channels(tmp_path):
  path = str(tmp_path / "g.png")
  Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "L").save(path)
  img = images.load_image(path)
  np.testing.assert_array_equal(img[..., 0], img[..., 1])
  np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_load_image_errors_name_the_file(tmp_path):
  path = tmp_path / "broken.jpg"
  path.write_bytes(b"nope")
  with pytest.raises(DataError, match="broken.jpg"):
    images.load_image(str(path))


# ------------------------------------------------------------------------------ views


@pytest.mark.parametrize("view", ["weak", "strong", "test"])
def test_view_shapes_and_determinism(view):
  img = _img()
  make = {"weak": lambda r: T.weak_view(img, r, resize=36, crop=32),
          "strong": lambda r: T.strong_view(img, r, crop=32),
          "test": lambda r: T.test_view(img, resize=36, crop=32)}[view]
  out = make(_rng(3))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
  np.testing.assert_array_equal(out, make(_rng(3)))
  if view != "test":
    assert any(not np.array_equal(out, make(_rng(s))) for s in range(4, 10))


def test_test_view_is_resize_then_centre_crop():
  img = _img(36, 36)  # already the resize size, so the crop can be checked exactly
  np.testing.assert_array_equal(T.test_view(img, resize=36, crop=32), img[2:34, 2:34])


def test_weak_view_is_a_crop_of_the_possibly_flipped_image():
  img = _img(36, 36)
  for seed in range(20):
    out = T.weak_view(img, _rng(seed), resize=36, crop=32)
    hits = [(y, x, f) for f, src in ((0, img), (1, img[:, ::-1]))
            for y in range(5) for x in range(5) if np.array_equal(src[y:y + 32, x:x + 32], out)]
    assert len(hits) == 1


def test_random_resized_crop_fallback_is_central():
  # A 1x40 strip: no crop with aspect in [3/4, 4/3] fits, so every attempt fails.
  img = _img(4, 40)
  out = T.random_resized_crop(img, _rng(0), size=4, scale=(0.99, 1.0))
  # Fallback: aspect 10 > 4/3 -> height 4, width round(4 * 4/3) = 5, centred at x = 17.
  np.testing.assert_array_equal(out, T.resize_bilinear(img[:, 17:22], 4, 4))


def test_cutout_box():
  img = np.zeros((40, 30, 3), np.uint8)
  for seed in range(50):
    rng = _rng(seed)
    out = T.cutout(img, rng, size=16, prob=1.0, fill=128)
    # Replay the draws: mmcv's centre np.random.uniform(size) = size + (1 - size) * u, in
    # (1, size]; top-left clamped at 0 before adding the size.
    replay = _rng(seed)
    replay.random()
    cy, cx = 40 + (1 - 40) * replay.random(), 30 + (1 - 30) * replay.random()
    assert 1 < cy <= 40 and 1 < cx <= 30
    y1, x1 = int(max(0, cy - 8)), int(max(0, cx - 8))
    expected = np.zeros_like(img)
    expected[y1:min(40, y1 + 16), x1:min(30, x1 + 16)] = 128
    np.testing.assert_array_equal(out, expected)
  assert np.array_equal(T.cutout(img, _rng(0), prob=0.0), img)


def test_normalize_numpy_and_jax():
  import jax.numpy as jnp
  from eercl_jax import config_defaults
  from eercl_jax.data import pipelines
  mean, std = config_defaults.IMAGENET_MEAN, config_defaults.IMAGENET_STD
  x = np.full((2, 2, 3), 255, np.uint8)
  expected = (255 - np.array(mean)) / np.array(std)
  for arr in (x, jnp.asarray(x)):
    y = pipelines.Normalization(mean, std)(arr)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y)[0, 0], expected, rtol=1e-6)


# ----------------------------------------------------------------------- RandRangeAug table


def test_fourteen_policies():
  assert len(T.POLICIES) == 14
  assert all(p.prob == 0.5 for p in T.POLICIES if p.name != "Identity")


@pytest.mark.parametrize("name, expected", [
    ("Brightness", [0.28 + 0.18 * i for i in range(10)]),
    ("ColorTransform", [0.28 + 0.18 * i for i in range(10)]),
    ("Contrast", [0.28 + 0.18 * i for i in range(10)]),
    ("Sharpness", [0.28 + 0.18 * i for i in range(10)]),
    ("Rotate", [-24, -18, -12, -6, 0, 6, 12, 18, 24, 30]),
    ("Shear_x", [0.03 * (i + 1) for i in range(10)]),
    ("Shear_y", [0.03 * (i + 1) for i in range(10)]),
    ("Solarize", [25.6 * (i + 1) for i in range(10)]),
    ("Translate_x", [-0.24, -0.18, -0.12, -0.06, 0, 0.06, 0.12, 0.18, 0.24, 0.30]),
    ("Translate_y", [-0.24, -0.18, -0.12, -0.06, 0, 0.06, 0.12, 0.18, 0.24, 0.30]),
])
def test_magnitude_table(name, expected):
  np.testing.assert_allclose(T.policy_magnitudes(name), expected, atol=1e-9)


def test_posterize_bits_table():
  bits = [math.ceil(m) for m in T.policy_magnitudes("Posterize")]
  assert bits == [5, 5, 6, 6, 6, 7, 7, 8, 8, 8]


def test_signs_and_factors():
  signed = {p.name for p in T.POLICIES if p.signed}
  assert signed == {"Brightness", "ColorTransform", "Contrast", "Sharpness", "Rotate", "Shear_x",
                    "Shear_y", "Translate_x", "Translate_y"}
  brightness = next(p for p in T.POLICIES if p.name == "Brightness")
  assert brightness.argument(-1.9) == pytest.approx(-0.9)  # factor = 1 + magnitude, may be <= 0


def test_rand_range_aug_deterministic_and_varied():
  img = _img(32, 32)
  a = T.rand_range_aug(img, _rng(1))
  np.testing.assert_array_equal(a, T.rand_range_aug(img, _rng(1)))
  assert a.shape == img.shape and a.dtype == np.uint8
  outs = {T.rand_range_aug(img, _rng(s)).tobytes() for s in range(30)}
  assert len(outs) > 10


def test_apply_policy_fires_with_prob_and_negates():
  calls = []
  policy = T.Policy("Probe", lambda img, m: calls.append(m) or img, (0, 1), prob=0.5, signed=True)
  for seed in range(400):
    T.apply_policy(policy, _img(2, 2), _rng(seed), 0.7)
  assert 160 < len(calls) < 240
  negative = sum(m < 0 for m in calls)
  assert 0.35 < negative / len(calls) < 0.65 and set(np.abs(calls)) == {0.7}


# ----------------------------------------------------------------------- ops by hand


def test_solarize():
  img = np.array([[[0, 100, 127], [128, 200, 255]]], np.uint8)
  np.testing.assert_array_equal(T.solarize(img, 128), [[[0, 100, 127], [127, 55, 0]]])
  np.testing.assert_array_equal(T.solarize(img, 256), img)  # level 10 is a no-op


def test_posterize():
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  for bits in (5, 6, 7, 8):
    keep = 256 - 2 ** (8 - bits)
    np.testing.assert_array_equal(T.posterize(img, bits), img & keep)


def test_brightness_factor_at_most_zero_gives_black():
  img = _img()
  for factor in (0.0, -0.5, -0.9):
    assert not T.brightness(img, factor).any()
  np.testing.assert_array_equal(T.brightness(img, 1.0), img)
  np.testing.assert_array_equal(T.brightness(img, 0.5), (img.astype(np.float32) * 0.5).astype(np.uint8))


def test_contrast_negative_factor_inverts_about_the_mean():
  img = np.array([[[100, 100, 100], [140, 140, 140]]], np.uint8)  # mean grey 120
  np.testing.assert_array_equal(T.contrast(img, -1.0), [[[140] * 3, [100] * 3]])


def test_color_zero_factor_is_grey():
  out = T.color(_img(), 0.0)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_sharpness_of_flat_image_is_identity():
  img = np.full((6, 6, 3), 77, np.uint8)
  np.testing.assert_array_equal(T.sharpness(img, 2.5), img)


def test_auto_contrast_and_equalize_stretch_to_full_range():
  # Values 50..149, 100 pixels each: enough pixels for equalize's step (n / 255) to be > 0.
  img = (np.arange(30000) % 100 + 50).astype(np.uint8).reshape(100, 100, 3)
  for op in (T.auto_contrast, T.equalize):
    out = op(img)
    assert out.dtype == np.uint8
    assert out[..., 0].min() == 0 and out[..., 0].max() >= 240
  np.testing.assert_array_equal(T.auto_contrast(np.full((3, 3, 3), 9, np.uint8)), 9)
  # Equalize against Pillow's implementation of the same rule.
  img = _img(20, 20)
  np.testing.assert_array_equal(T.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img))))


def _marker_image(n=21):
  img = np.zeros((n, n, 3), np.uint8)
  img[1:4, n // 2 - 1:n // 2 + 2] = 255   # a block at the top centre
  return img


def _marker_centre(img):
  ys, xs = np.nonzero(img[..., 0] == 255)
  return ys.mean(), xs.mean()


def test_rotate_positive_is_clockwise():
  n = 21
  y, x = _marker_centre(T.rotate(_marker_image(n), 90))
  assert (y, x) == pytest.approx((n // 2, n - 3), abs=0.6)  # top -> right
  y, x = _marker_centre(T.rotate(_marker_image(n), -90))
  assert (y, x) == pytest.approx((n // 2, 2), abs=0.6)      # top -> left
  out = T.rotate(_marker_image(n), 45)
  assert out[0, 0, 0] == 128  # corners uncovered by the rotated image get the fill value


def test_rotate_zero_is_identity():
  img = _img(15, 19)
  np.testing.assert_array_equal(T.rotate(img, 0.0), img)


def test_translate():
  img = _img(10, 20)
  out = T.translate_x(img, 0.25)            # 5 pixels right
  np.testing.assert_array_equal(out[:, 5:], img[:, :-5])
  assert (out[:, :5] == 128).all()
  out = T.translate_y(img, -0.3)            # 3 pixels up
  np.testing.assert_array_equal(out[:-3], img[3:])
  assert (out[-3:] == 128).all()


def test_shear_moves_lower_rows_right():
  img = np.zeros((20, 20, 3), np.uint8)
  img[:, 4] = 255                          # a vertical line at x = 4
  out = T.shear_x(img, 0.3)                # x' = x + 0.3 y
  for y in (0, 10, 19):
    assert abs(int(np.argmax(out[y, :, 0])) - (4 + 0.3 * y)) <= 1
  out = T.shear_y(np.swapaxes(img, 0, 1), 0.3)  # horizontal line at y = 4 -> y' = 4 + 0.3 x
  for x in (0, 10, 19):
    assert abs(int(np.argmax(out[:, x, 0])) - (4 + 0.3 * x)) <= 1


# ----------------------------------------------------------------- colour ops on colour images
# Reference restatements in float64 numpy. Greyscale is ITU-R 601 luma (OpenCV's and Pillow's
# RGB -> grey), not the plain mean of R, G and B: on pure primaries the two differ by 9..65 levels.


def _luma(img):
  return np.rint(img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


def _blend_ref(img, degenerate, factor):
  out = img.astype(np.float64) * factor + np.asarray(degenerate, np.float64) * (1 - factor)
  return np.clip(out, 0, 255).astype(np.uint8)  # truncated, as mmcv's float path


def _colour_image(kind):
  if kind in ("red", "green", "blue"):
    img = np.zeros((6, 7, 3), np.uint8)
    img[..., ("red", "green", "blue").index(kind)] = 255
    return img
  # Mostly saturated green and red (so the mean luma is far from the mean of R, G, B) plus noise.
  img = np.random.default_rng(5).integers(0, 256, (8, 9, 3), dtype=np.uint8)
  img[:4] = (0, 255, 0)
  img[4:6, :5] = (255, 0, 0)
  img[6:, :3] = (0, 0, 255)
  return img


def _assert_close(actual, expected, atol=1):
  assert actual.dtype == np.uint8 and actual.shape == expected.shape
  np.testing.assert_allclose(actual.astype(int), expected.astype(int), atol=atol, rtol=0)


FACTORS = (0.0, 0.5, -0.9, 1.28, 2.9)  # the enhancement quirk gives factors in [-0.9, 2.9]


@pytest.mark.parametrize("kind", ["red", "green", "blue", "mixed"])
def test_color_blends_with_luma_on_colour_images(kind):
  img = _colour_image(kind)
  for factor in FACTORS:
    _assert_close(T.color(img, factor), _blend_ref(img, _luma(img)[..., None], factor))
    # Pillow's ImageEnhance.Color (the op mmcv copies) agrees to within one level too.
    pil = np.asarray(ImageEnhance.Color(Image.fromarray(img)).enhance(factor))
    _assert_close(T.color(img, factor), pil)
  primary_grey = {"red": 76, "green": 150, "blue": 29}  # round(255 * 0.299 / 0.587 / 0.114)
  if kind in primary_grey:
    assert (T.color(img, 0.0) == primary_grey[kind]).all()


@pytest.mark.parametrize("kind", ["red", "green", "blue", "mixed"])
def test_contrast_blends_with_the_mean_luma_on_colour_images(kind):
  img = _colour_image(kind)
  mean = np.round(_luma(img).mean())
  for factor in FACTORS:
    _assert_close(T.contrast(img, factor), _blend_ref(img, mean, factor))
    pil = np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(factor))
    _assert_close(T.contrast(img, factor), pil)
  assert (T.contrast(img, 0.0) == mean).all()  # factor 0: the flat mean-luma image


def test_brightness_on_colour_images():
  img = _colour_image("mixed")
  for factor in FACTORS:
    _assert_close(T.brightness(img, factor), _blend_ref(img, 0, factor))
    pil = np.asarray(ImageEnhance.Brightness(Image.fromarray(img)).enhance(factor))
    _assert_close(T.brightness(img, factor), pil)


def _channels_with_different_ranges():
  """R spans 10..60, G 100..199, B is constant: each channel needs its own stretch/LUT."""
  img = np.zeros((10, 10, 3), np.uint8)
  img[..., 0] = np.arange(100).reshape(10, 10) % 51 + 10
  img[..., 1] = np.arange(100).reshape(10, 10) + 100
  img[..., 2] = 77
  return img


def test_auto_contrast_stretches_each_channel_on_its_own():
  img = _channels_with_different_ranges()
  out = T.auto_contrast(img)
  expected = img.copy()
  for c in range(2):
    lo, hi = int(img[..., c].min()), int(img[..., c].max())
    expected[..., c] = ((img[..., c] - lo) * 255.0 / (hi - lo)).astype(np.uint8)
  _assert_close(out, expected)
  assert out[..., 0].min() == 0 and out[..., 0].max() == 255  # reached only per channel
  assert out[..., 1].min() == 0 and out[..., 1].max() >= 254
  np.testing.assert_array_equal(out[..., 2], 77)  # a constant channel is left alone
  np.testing.assert_array_equal(out, np.asarray(ImageOps.autocontrast(Image.fromarray(img))))


def test_equalize_uses_each_channels_own_histogram():
  # 1600 pixels (enough for a non-zero LUT step, n / 255) with a different histogram per channel.
  rng = np.random.default_rng(1)
  img = np.stack([(rng.random((40, 40)) ** 2 * 100).astype(np.uint8),  # skewed to dark
                  rng.integers(100, 200, (40, 40)).astype(np.uint8),   # uniform, bright
                  rng.choice(np.array([30, 200], np.uint8), (40, 40), p=[0.3, 0.7])], -1)
  out = T.equalize(img)
  np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(img))))
  for c in range(3):  # each channel equals equalising it as a grey image
    assert not np.array_equal(out[..., c], img[..., c])
    grey = np.repeat(img[..., c:c + 1], 3, axis=-1)
    np.testing.assert_array_equal(out[..., c], T.equalize(grey)[..., 0])


def test_posterize_and_solarize_on_colour_images():
  img = _colour_image("mixed")
  pil = Image.fromarray(img)
  for bits in (5, 6, 7, 8):
    np.testing.assert_array_equal(T.posterize(img, bits), np.asarray(ImageOps.posterize(pil, bits)))
  for threshold in (25.6, 128, 204.8, 256):
    expected = np.where(img < threshold, img, 255 - img)  # per channel, not on the luma
    np.testing.assert_array_equal(T.solarize(img, threshold), expected)
  np.testing.assert_array_equal(T.solarize(img, 128), np.asarray(ImageOps.solarize(pil, 128)))


# --------------------------------------------------------------- the range of random offsets


def _coordinate_image(h, w):
  """Pixel (y, x) holds (y, x, 0), so a crop's first pixel is its offset."""
  y, x = np.mgrid[:h, :w]
  return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def test_weak_view_offsets_cover_0_to_resize_minus_crop_and_flip_is_fair():
  resize, crop, draws = 40, 8, 2000  # offsets 0..32 on each axis, as with the default 256/224
  img = _coordinate_image(resize, resize)  # already resize x resize, so the resize is a no-op
  counts = np.zeros((2, resize - crop + 1), int)
  flips = 0
  for seed in range(draws):
    out = T.weak_view(img, _rng(seed), resize, crop)
    flipped = out[0, 0, 1] > out[0, 1, 1]
    y = int(out[0, 0, 0])
    x = resize - 1 - int(out[0, 0, 1]) if flipped else int(out[0, 0, 1])
    src = img[:, ::-1] if flipped else img
    assert np.array_equal(out, src[y:y + crop, x:x + crop])
    counts[0, y] += 1
    counts[1, x] += 1
    flips += flipped
  # Both extremes (0 and resize - crop) are reached; 2000 / 33 = 61 per offset, sd ~8.
  assert counts.min() >= 30 and counts.max() <= 95, counts
  assert 0.45 < flips / draws < 0.55


def test_random_resized_crop_offsets_reach_every_border(monkeypatch):
  # Skip the final resize, so the output is the crop box itself and its first pixel its offset.
  monkeypatch.setattr(T, "resize_bilinear", lambda img, height, width: img)
  height, width = 16, 24
  img = _coordinate_image(height, width)
  at_start, at_end, spans = np.zeros(2, int), np.zeros(2, int), []
  for seed in range(2000):
    out = T.random_resized_crop(img, _rng(seed), size=8)
    y, x = int(out[0, 0, 0]), int(out[0, 0, 1])
    h, w = out.shape[:2]
    assert np.array_equal(out, img[y:y + h, x:x + w])
    for axis, (offset, free) in enumerate(((y, height - h), (x, width - w))):
      if free > 0:  # the box can move on this axis: offset uniform in 0..free
        at_start[axis] += offset == 0
        at_end[axis] += offset == free
        spans.append(offset / free)
  assert (at_start > 20).all() and (at_end > 20).all(), (at_start, at_end)
  assert abs(np.mean(spans) - 0.5) < 0.03
