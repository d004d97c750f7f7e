"""The pictures a run writes to TensorBoard: the confusion matrix of each evaluation list as an
image (true class down, predicted class across, class names on the axes), per-class accuracies as
scalars, and at the start of a run a grid of example training views.

Matplotlib draws the matrix (it is also what `tools/feature_map` draws with): class names on
both axes and a count in every cell are what make the picture readable, and the Agg backend
renders off-screen on any machine. It is imported only when a matrix is drawn.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

GRID_IMAGES = 8   # images per view in the start-of-run grid
_GAP = 2          # pixels between the images of the grid


def tag_name(name: str) -> str:
  """A class or list name made safe for a TensorBoard tag."""
  return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "_"


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


def view_grid(batch: Mapping[str, np.ndarray], keys: Sequence[str],
              count: int = GRID_IMAGES) -> np.ndarray:
  """(H, W, 3) uint8 grid of the first `count` images of each view in `keys` (one row per
  view, in order: e.g. weak, strong1, strong2), white gaps between them. The pipelines hand
  over uint8 images (normalisation happens on the device), so no de-normalisation is needed."""
  rows = []
  for key in keys:
    images = np.asarray(batch[key])[:count]
    if images.dtype != np.uint8:
      raise ValueError(f"view {key!r}: expected uint8 images, got {images.dtype}")
    n, h, w = images.shape[:3]
    row = np.full((h, n * w + (n - 1) * _GAP, 3), 255, np.uint8)
    for i, img in enumerate(images):
      row[:, i * (w + _GAP):i * (w + _GAP) + w] = img[..., :3] if img.ndim == 3 else img[..., None]
    rows.append(row)
  width = max(r.shape[1] for r in rows)
  out = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  gap = np.full((_GAP, width, 3), 255, np.uint8)
  return np.concatenate([x for r in out for x in (r, gap)][:-1], axis=0)


def write_evaluation(writer, step: int, results: Mapping[str, dict],
                     class_names: Sequence[str]) -> None:
  """The per-class accuracy scalars and a confusion-matrix image per list, at `step`."""
  writer.write_scalars(step, class_accuracy_scalars(results, class_names))
  images = {}
  for name, r in results.items():
    title = (f"{name} step {step}: acc {r['accuracy'] * 100:.1f}%, "
             f"mean class acc {r['mean_class_accuracy'] * 100:.1f}%")
    images[f"confusion/{tag_name(name)}"] = confusion_image(r["confusion"], class_names, title)
  writer.write_images(step, {k: v[None] for k, v in images.items()})


def write_views(writer, step: int, batch: Mapping[str, np.ndarray], keys: Sequence[str],
                tag: str = "views/train") -> None:
  """The grid of example views (rows: `keys`) as one TensorBoard image."""
  writer.write_images(step, {tag: view_grid(batch, keys)[None]})
