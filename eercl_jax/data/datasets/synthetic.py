"""A built-in synthetic FER data set: cartoon faces in two domains, in the real data layout.

The expression is carried by brows, eyes and mouth (as in real FER); identity-like nuisances
(face size, position, rotation, skin tone, hair, expression intensity) vary per image so the task
is not trivial. Two domains make a real shift:

* `synth_studio` (source): colour portraits, centred, clean, plain coloured background;
* `synth_wild` (target): faded (mostly grey), low-contrast, blurred, noisy, off-centre and
  rescaled faces on a cluttered grey background.

Layout (as `data/` of the original): images `<root>/fer/<domain>/<class>/<domain>_<split>_<i>.jpg`,
lists `<root>/txt/fer/*.txt` with paths relative to `<root>/fer/`, each with its class-order file
`<list>.classes.json` (CLASSES). The command:
`python -m eercl_jax.data.synthetic --root data --image_size 64`.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from eercl_jax.data import lists

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
SOURCE, TARGET = "synth_studio", "synth_wild"
_VERSION = 4  # bump when the drawing changes, so ensure_generated regenerates old data
_MANIFEST = "synthetic_manifest.json"
_SUPERSAMPLE = 2  # drawn at 2x and downsampled: cheap anti-aliasing of the thin strokes
DEFAULTS = dict(image_size=64, train_per_class=150, test_per_class=40, target_per_class=60,
                seed=0)

# Expression geometry in face units (u: -1..1 left->right, v: -1..1 top->bottom; negative v = up):
# brow_in/brow_out: raise of the inner/outer brow ends, eye: eye opening (1 = neutral),
# curve: mouth corners up (+) or down (-), width: mouth half-width, open: mouth half-height,
# wave: wavy-lip amplitude, tilt: one-sided lip raise, brow_asym: one brow lower than the other.
_FEATURES = ("brow_in", "brow_out", "eye", "curve", "width", "open", "wave", "tilt", "brow_asym")
_NEUTRAL = dict(brow_in=0.0, brow_out=0.0, eye=1.0, curve=0.0, width=0.36, open=0.0, wave=0.0,
                tilt=0.0, brow_asym=0.0)
_EXPRESSIONS = {
    "angry": dict(brow_in=0.13, brow_out=-0.06, eye=0.7, curve=-0.03, width=0.24),
    "disgust": dict(brow_in=0.06, brow_out=0.04, eye=0.35, curve=-0.06, open=0.04, tilt=0.10,
                    brow_asym=0.06),
    "fear": dict(brow_in=-0.14, brow_out=-0.03, eye=1.6, width=0.40, open=0.05, wave=0.035),
    "happy": dict(brow_out=-0.03, eye=0.75, curve=0.16, width=0.44),
    "neutral": dict(),
    "sad": dict(brow_in=-0.12, brow_out=0.06, eye=0.8, curve=-0.13, width=0.32),
    "surprise": dict(brow_in=-0.17, brow_out=-0.17, eye=1.7, width=0.15, open=0.17),
}
_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 96],
                  [141, 85, 54], [96, 60, 40]], np.float64)
# Strength of the wild domain's nuisances (uniform draws in (low, high)). Fully grey faces cost a
# small CNN trained from scratch on studio ~25 points, and the demo's tiny ViT (which leans on
# the mouth's colour) fell to near chance, leaving adaptation nothing to build on; the faded
# colour (`saturation`, the fraction of colour kept) keeps a real but recoverable shift.
WILD = dict(face_radius=(0.29, 0.36), face_shift=0.05, rotation=8, clutter=(0, 3),
            blur=(0.0, 0.3), contrast=(0.85, 1.0), brightness=10, noise=(1, 2),
            saturation=(0.3, 0.6))
_HAIR = np.array([[30, 25, 20], [80, 50, 30], [150, 110, 60], [220, 190, 120], [120, 120, 120],
                  [160, 50, 30]], np.float64)


def _expression(name: str, intensity: float, rng: np.random.Generator) -> dict:
  """Neutral + intensity * (expression - neutral), with a little per-feature noise."""
  target = {**_NEUTRAL, **_EXPRESSIONS[name]}
  out = {k: _NEUTRAL[k] + intensity * (target[k] - _NEUTRAL[k]) for k in _FEATURES}
  out["brow_in"] += rng.normal(0, 0.015)
  out["brow_out"] += rng.normal(0, 0.015)
  out["eye"] *= math.exp(rng.normal(0, 0.08))
  out["curve"] += rng.normal(0, 0.012)
  out["width"] *= math.exp(rng.normal(0, 0.08))
  return out


class _Face:
  """Maps face units to canvas pixels: scale by the radii, rotate, translate."""

  def __init__(self, cx, cy, rx, ry, angle_deg):
    self.c = np.array([cx, cy])
    self.r = np.array([rx, ry])
    a = math.radians(angle_deg)
    self.rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

  def px(self, uv) -> list:
    pts = (np.atleast_2d(np.asarray(uv, np.float64)) * self.r) @ self.rot.T + self.c
    return [tuple(p) for p in pts]

  def ellipse(self, cu, cv, ru, rv, n=32) -> list:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return self.px(np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], -1))

  def width(self, w) -> int:
    return max(1, int(round(w * self.r[0])))


def _draw_face(draw: ImageDraw.ImageDraw, face: _Face, expr: dict, skin, hair) -> None:
  ink = tuple(int(c) for c in np.clip(skin * 0.35, 0, 255))
  if hair is not None:  # a cap of hair behind the top of the head
    draw.polygon(face.ellipse(0, -0.25, 1.08, 0.85), fill=hair)
  draw.polygon(face.ellipse(0, 0, 1, 1), fill=tuple(int(c) for c in skin))

  for s in (-1, 1):  # s = -1: left half of the picture
    # Eyes: white, with a pupil no taller than the opening.
    eye_h = 0.075 * expr["eye"]
    draw.polygon(face.ellipse(s * 0.36, -0.15, 0.15, eye_h), fill=(250, 250, 250),
                 outline=ink)
    pupil = min(0.06, eye_h * 0.9)
    draw.polygon(face.ellipse(s * 0.36, -0.15, pupil * face.r[1] / face.r[0], pupil, n=16),
                 fill=(20, 20, 20))
    # Brows: inner and outer end raised/lowered; disgust lowers one side more.
    asym = expr["brow_asym"] * (1 if s > 0 else -0.3)
    inner = (s * 0.13, -0.40 + expr["brow_in"] + asym)
    outer = (s * 0.58, -0.40 + expr["brow_out"] + asym)
    draw.line(face.px([inner, outer]), fill=ink, width=face.width(0.15))

  draw.line(face.px([(0, -0.08), (-0.05, 0.17), (0.05, 0.19)]), fill=ink, width=face.width(0.04))

  # Mouth: a centre line (curve, tilt, wave) and, when open, a dark elliptic opening around it.
  w = expr["width"]
  u = np.linspace(-w, w, 21)
  t = u / w
  centre = (0.52 - expr["curve"] * (t ** 2 - 0.5) - expr["tilt"] * np.maximum(t, 0)
            + expr["wave"] * np.sin(3 * np.pi * t))
  if expr["open"] > 0.01:
    half = expr["open"] * np.sqrt(np.clip(1 - t ** 2, 0, 1))
    outline = np.concatenate([np.stack([u, centre - half], -1),
                              np.stack([u, centre + half], -1)[::-1]])
    draw.polygon(face.px(outline), fill=(60, 20, 20), outline=ink)
  else:
    draw.line(face.px(np.stack([u, centre], -1)), fill=(120, 25, 25), width=face.width(0.13))


def _studio_background(size, rng):
  colour = tuple(int(c) for c in rng.uniform(120, 240, 3))
  return Image.new("RGB", (size, size), colour)


def _wild_background(size, rng):
  """Grey clutter: random boxes, blobs and lines."""
  bg = Image.new("RGB", (size, size), tuple([int(rng.uniform(40, 200))] * 3))
  draw = ImageDraw.Draw(bg)
  for _ in range(int(rng.integers(*WILD["clutter"]))):
    x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
    x1, y1 = np.array([x0, y0]) + rng.uniform(0.1, 0.6, 2) * size
    grey = tuple([int(rng.uniform(0, 255))] * 3)
    kind = rng.integers(3)
    if kind == 0:
      draw.rectangle([x0, y0, x1, y1], fill=grey)
    elif kind == 1:
      draw.ellipse([x0, y0, x1, y1], fill=grey)
    else:
      draw.line([x0, y0, x1, y1], fill=grey, width=int(rng.integers(1, 4)) * _SUPERSAMPLE)
  return bg


def render(label: int, domain: str, image_size: int, rng: np.random.Generator) -> Image.Image:
  """One face of class `label` (RGB) in the given domain."""
  wild = domain == TARGET
  size = image_size * _SUPERSAMPLE
  canvas = (_wild_background if wild else _studio_background)(size, rng)
  if wild:  # off-centre, rescaled, more rotated
    rx = rng.uniform(*WILD["face_radius"]) * size
    cx, cy = (0.5 + rng.uniform(-WILD["face_shift"], WILD["face_shift"], 2)) * size
    angle = rng.uniform(-WILD["rotation"], WILD["rotation"])
  else:
    rx = rng.uniform(0.30, 0.36) * size
    cx, cy = (0.5 + rng.uniform(-0.04, 0.04, 2)) * size
    angle = rng.uniform(-6, 6)
  face = _Face(cx, cy + 0.03 * size, rx, rx * rng.uniform(1.15, 1.3), angle)
  skin = np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 8, 3), 0, 255)
  hair = None
  if rng.random() < 0.7:
    hair = tuple(int(c) for c in np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3),
                                         0, 255))
  expr = _expression(CLASSES[label], rng.uniform(0.6, 1.2), rng)
  _draw_face(ImageDraw.Draw(canvas), face, expr, skin, hair)
  img = canvas.resize((image_size, image_size), Image.Resampling.BILINEAR)
  if not wild:
    return img

  blur = rng.uniform(*WILD["blur"]) * image_size / 64
  rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), np.float32)
  grey = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  x = grey + rng.uniform(*WILD["saturation"]) * (rgb - grey)
  x = (x.mean() + (x - x.mean()) * rng.uniform(*WILD["contrast"])
       + rng.uniform(-WILD["brightness"], WILD["brightness"]))
  x += rng.normal(0, rng.uniform(*WILD["noise"]), x.shape[:2])[..., None]
  return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------- files and lists


def list_paths(root: str) -> dict:
  txt = os.path.join(root, "txt", "fer")
  return {
      "image_root": os.path.join(root, "fer"),
      "source_train": os.path.join(txt, f"labeled_source_images_{SOURCE}.txt"),
      "source_test": os.path.join(txt, f"unlabeled_target_images_{SOURCE}_0.txt"),
      "target": os.path.join(txt, f"unlabeled_target_images_{TARGET}_0.txt"),
  }


def _write_split(root, list_path, domain, split, per_class, image_size, seed, split_id):
  """Renders `per_class` images of every class; list lines interleave the classes. The list's
  class-order file (`lists.write_list`) records CLASSES."""
  lines = []
  for i in range(per_class):
    for label, name in enumerate(CLASSES):
      rng = np.random.default_rng([seed, split_id, label, i])
      rel = f"{domain}/{name}/{domain}_{split}_{i:04d}.jpg"
      path = os.path.join(root, "fer", rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      render(label, domain, image_size, rng).save(path, quality=90)
      lines.append((rel, label))
  lists.write_list(list_path, lines, CLASSES)   # and its class-order file


def generate(root: str, *, image_size: int = DEFAULTS["image_size"],
             train_per_class: int = DEFAULTS["train_per_class"],
             test_per_class: int = DEFAULTS["test_per_class"],
             target_per_class: int = DEFAULTS["target_per_class"], seed: int = DEFAULTS["seed"],
             overwrite: bool = False) -> dict:
  """Writes both domains and their three lists under `root`; returns `list_paths(root)`."""
  paths = list_paths(root)
  params = dict(version=_VERSION, image_size=image_size, train_per_class=train_per_class,
                test_per_class=test_per_class, target_per_class=target_per_class, seed=seed)
  existing = [p for k, p in paths.items() if k != "image_root" and os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"synthetic lists already exist ({existing[0]}); pass overwrite=True")
  for domain in (SOURCE, TARGET):  # only our own folders: stale images must not linger
    shutil.rmtree(os.path.join(paths["image_root"], domain), ignore_errors=True)
  os.makedirs(os.path.dirname(paths["target"]), exist_ok=True)
  _write_split(root, paths["source_train"], SOURCE, "train", train_per_class, image_size, seed, 0)
  _write_split(root, paths["source_test"], SOURCE, "test", test_per_class, image_size, seed, 1)
  _write_split(root, paths["target"], TARGET, "target", target_per_class, image_size, seed, 2)
  # Written last: its presence means a complete generation.
  with open(os.path.join(os.path.dirname(paths["target"]), _MANIFEST), "w") as f:
    json.dump(params, f, indent=1, sort_keys=True)
  return paths


def ensure_generated(root: str, **kw) -> dict:
  """Generates the set unless a complete one with the same parameters is already there."""
  paths = list_paths(root)
  manifest = os.path.join(os.path.dirname(paths["target"]), _MANIFEST)
  unknown = set(kw) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown synthetic data parameters {sorted(unknown)}")
  wanted = dict(version=_VERSION, **{**DEFAULTS, **kw})
  try:
    with open(manifest) as f:
      found = json.load(f)
  except (OSError, ValueError):
    found = None
  if found == wanted and all(os.path.exists(p) for p in paths.values()):
    # A set generated before lists carried their class order: the same files, given their
    # class-order files (the labels index CLASSES by construction).
    for key, path in paths.items():
      if key != "image_root" and lists.read_classes(path) is None:
        lists.write_classes(path, CLASSES)
    return paths
  kw = {k: v for k, v in wanted.items() if k != "version"}
  return generate(root, overwrite=True, **kw)
