"""The pictures: confusion-matrix images, per-class accuracy scalars and the view grid read back
from TensorBoard after tiny runs of both stages (the adaptation's step-0 source-only matrix
included); the feature-map command; one progress line per logging step; terminal-only progress."""
import glob
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from eercl_jax import config_defaults, feature_map, logs, pictures, train_adapt
from eercl_jax.data.datasets import synthetic
# The adaptation tests' tiny config (and conftest's shared tiny source run): the same programs,
# so in a whole suite run the persistent compilation cache serves one file's compilations to the
# other.
from tests.test_train_adapt import _config as _adapt_config
from tests.conftest import REPO


@pytest.fixture(scope="module")
def runs(data_dir, source_run, tmp_path_factory):
  """The tiny source run (4 steps) and a tiny adaptation from it (2 steps): their workdirs."""
  workdir = tmp_path_factory.mktemp("pictures") / "adapt"
  old = os.getcwd()
  os.chdir(data_dir)
  try:
    config = _adapt_config(source_run, num_steps=2)
    train_adapt.train_and_evaluate(config, str(workdir))
  finally:
    os.chdir(old)
  return {"source": pathlib.Path(source_run), "adapt": workdir,
          "classes": config.data.class_names}


def _events(workdir):
  """{tag: {step: value}}: scalars as floats, images as decoded (H, W, 3) uint8 arrays."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for path in glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0, "images": 0,
                                                                  "scalars": 0})
    acc.Reload()
    # Scalars are plain values (EventAccumulator.Scalars reads them), images PNGs; the only
    # tensors are the run's hparams records (test_records reads them).
    assert all(tag.startswith("_hparams_") for tag in acc.Tags()["tensors"])
    for tag in acc.Tags()["scalars"]:
      for ev in acc.Scalars(tag):
        out.setdefault(tag, {})[ev.step] = ev.value
    for tag in acc.Tags()["images"]:
      for ev in acc.Images(tag):
        image = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
        assert image.shape == (ev.height, ev.width, 3)
        out.setdefault(tag, {})[ev.step] = image
  return out


def test_tensorboard_holds_confusions_class_accuracies_and_views(runs):
  classes = runs["classes"]
  adapt = _events(runs["adapt"])
  # The step-0 (source-only) and the final (adapted) matrix of each list, as images.
  for name in ("target", "source"):
    assert set(adapt[f"confusion/{name}"]) == {0, 2}
    img = adapt[f"confusion/{name}"][0]
    assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) > 200
    assert img.std() > 10   # drawn, not blank
  # Per-class accuracies, at both steps, consistent with the logged accuracies: their mean is
  # the mean class accuracy, their count-weighted mean the accuracy (the dry run's target list
  # has unequal class counts, so the two differ and a swap of them fails here).
  counts = synthetic.class_counts(config_defaults.RUNLOCAL_SYNTHETIC["target_per_class"],
                                  config_defaults.RUNLOCAL_SYNTHETIC["imbalanced"])
  for step in (0, 2):
    per = [adapt[f"eval/target/class_acc/{c}"][step] for c in classes]
    assert all(0.0 <= p <= 1.0 for p in per)
    assert np.mean(per) == pytest.approx(adapt["eval/target_mean_class_accuracy"][step])
    assert np.average(per, weights=counts) == pytest.approx(adapt["eval/target_accuracy"][step])
  # The view grid: weak, strong1, strong2 rows of 8 images of 32 px enlarged 3x to 96 px, a
  # column of view names on the left and a row of class names on top.
  grid = adapt["views/train"][0]
  assert 3 * 96 + 2 * 4 < grid.shape[0] < 3 * 96 + 60
  assert 8 * 96 + 7 * 4 < grid.shape[1] < 8 * 96 + 200
  source = _events(runs["source"])
  assert 96 < source["views/train"][0].shape[0] < 96 + 60
  assert set(source["confusion/source"]) == {4}
  assert {f"eval/source/class_acc/{c}" for c in classes} <= set(source)
  assert {"eval/source_macro_f1", "eval/target_macro_f1"} <= set(source)


def test_confusion_image_and_grid_helpers():
  cm = np.array([[5, 1], [0, 4]])
  a = pictures.confusion_image(cm, ["a", "b"])
  b = pictures.confusion_image(np.array([[0, 6], [4, 0]]), ["a", "b"])
  assert a.dtype == np.uint8 and a.shape == b.shape and not np.array_equal(a, b)
  s = pictures.class_accuracy_scalars(
      {"tgt list": {"per_class_accuracy": np.array([0.5, np.nan])}}, ["happy", "sad face"])
  assert s["eval/tgt_list/class_acc/happy"] == 0.5
  assert np.isnan(s["eval/tgt_list/class_acc/sad_face"])
  with pytest.raises(ValueError, match="uint8"):
    pictures.view_grid({"image": np.zeros((2, 4, 4, 3), np.float32)}, ["image"])


def _box(mask):
  ys, xs = np.nonzero(mask)
  return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_view_grid_enlarges_small_crops_and_labels_rows_and_columns():
  batch = {"weak": np.broadcast_to(np.uint8([7, 200, 31]), (3, 4, 5, 3)),
           "strong1": np.broadcast_to(np.uint8([130, 20, 240]), (3, 4, 5, 3)),
           "label": np.array([3, 0, 6], np.int32)}
  names = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
  g = pictures.view_grid(batch, ["weak", "strong1"], class_names=names)
  # Each 4 x 5 image is enlarged 24x (nearest) to at least 96 px: a row of 3 tiles of 96 x 120
  # with 4-px gaps, one row per view.
  weak, strong = np.all(g == [7, 200, 31], -1), np.all(g == [130, 20, 240], -1)
  assert weak.sum() == strong.sum() == 3 * 96 * 120
  y0, y1, x0, x1 = _box(weak)
  assert (y1 - y0, x1 - x0) == (96, 3 * 120 + 2 * 4)
  assert _box(strong) == (y1 + 4, y1 + 4 + 96, x0, x1)
  # Text: the view names left of the tiles, the class names above them.
  ink = (np.ptp(g, axis=-1) < 8) & (g.mean(-1) < 160)   # dark grey: text
  assert ink[y0:y1, :x0].any() and ink[y1 + 4:, :x0].any()      # 'weak', 'strong1'
  assert ink[:y0, x0:x1].any() and not ink[:y0, :x0].any()      # the classes, over the tiles
  for tile in range(3):   # a class name over every column
    assert ink[:y0, x0 + tile * 124:x0 + tile * 124 + 120].any()
  # Without labels there is no header row; without class names either.
  bare = pictures.view_grid({"image": batch["weak"]}, ["image"])
  assert _box(np.all(bare == [7, 200, 31], -1))[0] == 4
  assert pictures.view_grid(batch, ["weak"]).shape[0] == 96 + 2 * 4
  # Large crops are not enlarged.
  big = pictures.view_grid({"image": np.zeros((2, 112, 112, 3), np.uint8)}, ["image"])
  assert big.shape[0] == 112 + 2 * 4


def test_data_set_names_in_titles():
  assert pictures.dataset_name("data/txt/fer/unlabeled_target_images_expw_0.txt") == "expw"
  assert pictures.dataset_name("labeled_source_images_synth_studio.txt") == "synth_studio"
  assert pictures.dataset_name("x/unlabeled_target_images_synth_wild_0.txt") == "synth_wild"
  assert pictures.dataset_name("privatetest_images_fer2013.txt") == "fer2013"
  assert pictures.dataset_name("my_faces.txt") == "my_faces"
  assert pictures.list_label("target", "a/unlabeled_target_images_expw_0.txt") == "target: expw"
  assert pictures.list_label("expw", "a/unlabeled_target_images_expw_0.txt") == "expw"
  assert pictures.list_label("target", None) == "target"

  titles, written = [], {}

  class Writer:
    def write_scalars(self, step, scalars):
      written.update(scalars)

    def write_images(self, step, images):
      written.update(images)
  import unittest.mock  # pylint: disable=import-outside-toplevel
  real = pictures.confusion_image
  with unittest.mock.patch.object(pictures, "confusion_image",
                                  lambda cm, names, title: titles.append(title) or
                                  real(cm, names, title)):
    pictures.write_evaluation(
        Writer(), 300, {"target": {"accuracy": 0.5, "mean_class_accuracy": 0.25,
                                   "per_class_accuracy": np.array([0.5, 0.0]),
                                   "confusion": np.array([[1, 1], [0, 0]])}},
        ["happy", "sad"], {"target": "data/txt/fer/unlabeled_target_images_expw_0.txt"})
  assert titles == ["target: expw, step 300: acc 50.0%, mean class acc 25.0%"]
  assert written["confusion/target"].shape[0] == 1


def test_each_progress_line_is_logged_once(runs):
  log = open(runs["source"] / "logs" / "train.log").read()
  assert sum("step 4/4 " in line for line in log.splitlines()) == 1
  assert sum("step 2/4 " in line for line in log.splitlines()) == 1
  assert "train/loss=" not in log   # clu's logging writer's copy of the same numbers


def test_progress_shows_on_a_terminal_only():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  tty, pipe = Tty(), io.StringIO()
  assert list(logs.tty_progress(range(3), 3, "eval target", stream=tty)) == [0, 1, 2]
  assert "\reval target 3/3" in tty.getvalue() and tty.getvalue().endswith("\r")
  assert list(logs.tty_progress(range(3), 3, "eval target", stream=pipe)) == [0, 1, 2]
  assert pipe.getvalue() == ""


def test_feature_map_command_writes_a_png(runs, data_dir, tmp_path):
  out = tmp_path / "map.png"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.tools.feature_map", str(runs["adapt"]), str(out),
       "--max_per_list=40", "--perplexity=10", "--batch_size=64"],
      cwd=data_dir, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout and "target: 40" in proc.stdout and "source: 40" in proc.stdout
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(out) as im:
    assert im.format == "PNG"
    w, h = im.size
    pixels = np.asarray(im.convert("RGB"))
  assert w > 2 * h > 500          # two panels side by side, plus the legend
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20   # coloured points were drawn


def test_feature_map_legend_names_the_data_sets(runs, data_dir, monkeypatch):
  drawn = {}
  monkeypatch.chdir(data_dir)
  monkeypatch.setattr(feature_map, "tsne", lambda f, perplexity, seed: f[:, :2])
  monkeypatch.setattr(feature_map, "draw", lambda panels, labels, domains, classes, names, out:
                      drawn.update(names=names))
  feature_map.feature_map(str(runs["adapt"]), "unused.png", max_per_list=8, batch_size=64)
  # (In the run's list order, which the stored config may have sorted.)
  assert sorted(drawn["names"]) == ["source: synth_studio", "target: synth_wild"]


def test_feature_map_refuses_a_source_run_and_unknown_lists(runs):
  with pytest.raises(ValueError, match="name an adaptation run"):
    feature_map.feature_map(str(runs["source"]), "unused.png")
  with pytest.raises(ValueError, match="--lists"):
    feature_map.feature_map(str(runs["adapt"]), "unused.png", list_names=["tagret"])
