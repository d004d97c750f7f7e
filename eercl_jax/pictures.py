"""The pictures a run writes to TensorBoard: the confusion matrix of each evaluation list as an
image (true class down, predicted class across, class names on the axes, the list's data set in
the title), per-class accuracies as scalars, and at the start of a run a grid of example
training views (one labelled row per view, the image's class above each column).

Matplotlib draws the matrix (it is also what `tools/feature_map` draws with): class names on
both axes and a count in every cell are what make the picture readable, and the Agg backend
renders off-screen on any machine. It is imported only when a matrix is drawn.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

GRID_IMAGES = 8   # images per view in the start-of-run grid
GRID_TILE = 96    # smallest side of a grid image in pixels: small crops are enlarged (nearest)
_GAP = 4          # pixels between the images of the grid
_FONT_PX = 14


def tag_name(name: str) -> str:
  """A class or list name made safe for a TensorBoard tag."""
  return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "_"


def dataset_name(list_path: str) -> str:
  """The data set of a list file, from the list naming of data/txt/fer:
  'unlabeled_target_images_expw_0.txt' -> 'expw', 'labeled_source_images_synth_studio.txt' ->
  'synth_studio'; another file's name without its extension."""
  stem = os.path.splitext(os.path.basename(str(list_path)))[0]
  if "_images_" in stem:
    stem = stem.split("_images_", 1)[1]
    stem = re.sub(r"_[0-9]+$", "", stem) or stem
  return stem


def list_label(name: str, list_path: str | None) -> str:
  """A list's name with its data set, for titles and legends: 'target: expw' (the name alone
  when the list has no path or is named after its data set)."""
  if not list_path:
    return str(name)
  data = dataset_name(list_path)
  return str(name) if data == str(name) else f"{name}: {data}"


def class_accuracy_scalars(results: Mapping[str, dict], class_names: Sequence[str]) -> dict:
  """{'eval/<list>/class_acc/<class>': accuracy} for every list and class. A class with no
  image in a list gets NaN (TensorBoard shows a gap), as its accuracy is undefined."""
  out = {}
  for name, r in results.items():
    for cls, acc in zip(class_names, np.asarray(r["per_class_accuracy"], np.float64)):
      out[f"eval/{tag_name(name)}/class_acc/{tag_name(cls)}"] = float(acc)
  return out


def confusion_image(confusion: np.ndarray, class_names: Sequence[str], title: str = "",
                    dpi: int = 80) -> np.ndarray:
  """(H, W, 3) uint8 picture of a confusion matrix: rows = true class, columns = predicted,
  cells coloured by the row-normalised rate (each true class sums to 1) and labelled with the
  count."""
  # pylint: disable=import-outside-toplevel
  import matplotlib
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  cm = np.asarray(confusion, np.int64)
  c = len(cm)
  rows = cm.sum(axis=1, keepdims=True)
  rate = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
  # Fixed margins from the longest class name (tight_layout would cost a third of the time).
  longest = max([len(str(n)) for n in class_names] + [4])
  left, bottom, top, right = 0.5 + 0.065 * longest, 0.45 + 0.05 * longest, 0.35, 1.1
  cell = 0.45
  width, height = left + c * cell + right, bottom + c * cell + top
  fig = Figure(figsize=(width, height), dpi=dpi)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_axes((left / width, bottom / height, c * cell / width, c * cell / height))
  cax = fig.add_axes(((left + c * cell + 0.15) / width, bottom / height, 0.15 / width,
                      c * cell / height))
  im = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(im, cax=cax)
  cax.set_ylabel("fraction of the true class", fontsize=7)
  cax.tick_params(labelsize=7)
  ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(c), labels=list(class_names), fontsize=8)
  ax.set_xlabel("predicted class", fontsize=8)
  ax.set_ylabel("true class", fontsize=8)
  if title:
    ax.set_title(title, fontsize=8)
  for i in range(c):
    for j in range(c):
      ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
              color="white" if rate[i, j] > 0.5 else "black")
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _font(px: int = _FONT_PX):
  from PIL import ImageFont  # pylint: disable=import-outside-toplevel
  try:
    return ImageFont.load_default(size=px)   # Pillow >= 10.1 with FreeType: a scalable font
  except TypeError:
    return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
  """`text`, cut with '…' to fit `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "…", font=font) > width:
    text = text[:-1]
  return text + "…"


def view_grid(batch: Mapping[str, np.ndarray], keys: Sequence[str],
              count: int = GRID_IMAGES, class_names: Sequence[str] | None = None,
              min_tile: int = GRID_TILE) -> np.ndarray:
  """(H, W, 3) uint8 grid of the first `count` images of each view in `keys`: one row per view
  (e.g. weak, strong1, strong2), its name on the left; a column per image, its class
  (`batch['label']` named by `class_names`, when both are given) on top. Images smaller than
  `min_tile` pixels are enlarged by a whole factor (nearest neighbour, so the pixels the model
  sees stay visible). The pipelines hand over uint8 images (normalisation happens on the
  device), so no de-normalisation is needed."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  views = []
  for key in keys:
    images = np.asarray(batch[key])[:count]
    if images.dtype != np.uint8:
      raise ValueError(f"view {key!r}: expected uint8 images, got {images.dtype}")
    if images.ndim == 3:   # grey (N, H, W)
      images = images[..., None]
    views.append(np.broadcast_to(images[..., :3], images.shape[:3] + (3,)))
  h = max(v.shape[1] for v in views)
  w = max(v.shape[2] for v in views)
  scale = max(1, -(-min_tile // max(min(h, w), 1)))
  th, tw = h * scale, w * scale
  n = max(len(v) for v in views)
  labels = None
  if class_names is not None and "label" in batch:
    labels = [int(l) for l in np.asarray(batch["label"]).reshape(-1)[:n]]

  font = _font()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line = _FONT_PX + 6
  left = int(max(probe.textlength(str(k), font=font) for k in keys)) + 2 * _GAP + 4
  top = line + _GAP if labels else _GAP
  width = left + n * tw + (n - 1) * _GAP + _GAP
  height = top + len(views) * th + (len(views) - 1) * _GAP + _GAP
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for r, (key, images) in enumerate(zip(keys, views)):
    y = top + r * (th + _GAP)
    draw.text((_GAP, y + th // 2), str(key), fill=(0, 0, 0), font=font, anchor="lm")
    for i, img in enumerate(images):
      big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
      canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (left + i * (tw + _GAP), y))
  if labels:
    for i, label in enumerate(labels):
      name = str(class_names[label]) if 0 <= label < len(class_names) else f"label {label}"
      x = left + i * (tw + _GAP) + tw // 2
      draw.text((x, top - _GAP - line // 2), _fit(draw, name, font, tw), fill=(0, 0, 0),
                font=font, anchor="mm")
  return np.asarray(canvas, np.uint8).copy()


def write_evaluation(writer, step: int, results: Mapping[str, dict],
                     class_names: Sequence[str],
                     list_paths: Mapping[str, str] | None = None) -> None:
  """The per-class accuracy scalars and a confusion-matrix image per list, at `step`; a title
  names the list's data set (from `list_paths`, {name: list file}: 'target: expw')."""
  writer.write_scalars(step, class_accuracy_scalars(results, class_names))
  images = {}
  for name, r in results.items():
    label = list_label(name, (list_paths or {}).get(name))
    title = (f"{label}, step {step}: acc {r['accuracy'] * 100:.1f}%, "
             f"mean class acc {r['mean_class_accuracy'] * 100:.1f}%")
    images[f"confusion/{tag_name(name)}"] = confusion_image(r["confusion"], class_names, title)
  writer.write_images(step, {k: v[None] for k, v in images.items()})


def write_views(writer, step: int, batch: Mapping[str, np.ndarray], keys: Sequence[str],
                tag: str = "views/train", class_names: Sequence[str] | None = None) -> None:
  """The grid of example views (rows: `keys`, columns labelled with their class) as one
  TensorBoard image."""
  writer.write_images(step, {tag: view_grid(batch, keys, class_names=class_names)[None]})
