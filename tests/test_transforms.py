"""Views and RandRangeAug ops: shapes, determinism, the RandRangeAug table of docs/method.md, a
few ops by hand."""
import math

import numpy as np
from PIL import Image, ImageOps
import pytest

from eercl_jax.data import lists, transforms as T


def _img(h=40, w=56, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "CMYK", "P"])
def test_load_image_always_rgb(tmp_path, mode):
  path = str(tmp_path / f"x_{mode}.{'jpg' if mode in ('L', 'RGB', 'CMYK') else 'png'}")
  Image.new(mode, (9, 7)).save(path)
  img = T.load_image(path)
  assert img.shape == (7, 9, 3) and img.dtype == np.uint8


def test_load_grey_replicates_channels(tmp_path):
  path = str(tmp_path / "g.png")
  Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "L").save(path)
  img = T.load_image(path)
  np.testing.assert_array_equal(img[..., 0], img[..., 1])
  np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_load_image_errors_name_the_file(tmp_path):
  path = tmp_path / "broken.jpg"
  path.write_bytes(b"nope")
  with pytest.raises(lists.DataError, match="broken.jpg"):
    T.load_image(str(path))


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
  np.testing.assert_array_equal(out, T._resize(img[:, 17:22], 4, 4))


def test_cutout_box():
  img = np.zeros((40, 30, 3), np.uint8)
  for seed in range(50):
    rng = _rng(seed)
    out = T.cutout(img, rng, size=16, prob=1.0, fill=128)
    # Replay the draws: centre (cy, cx) uniform; top-left clamped at 0 before adding the size.
    replay = _rng(seed)
    replay.random()
    cy, cx = replay.uniform(0, 40), replay.uniform(0, 30)
    y1, x1 = int(max(0, cy - 8)), int(max(0, cx - 8))
    expected = np.zeros_like(img)
    expected[y1:min(40, y1 + 16), x1:min(30, x1 + 16)] = 128
    np.testing.assert_array_equal(out, expected)
  assert np.array_equal(T.cutout(img, _rng(0), prob=0.0), img)


def test_normalize_numpy_and_jax():
  import jax.numpy as jnp
  x = np.full((2, 2, 3), 255, np.uint8)
  expected = (255 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
  for arr in (x, jnp.asarray(x)):
    y = T.normalize(arr, T.IMAGENET_MEAN, T.IMAGENET_STD)
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
