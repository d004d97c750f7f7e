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

from eercl_jax import config_defaults, logs, pictures, train_adapt
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
  import tensorflow as tf
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for path in glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for ev in acc.Tensors(tag):
        t = tf.make_ndarray(ev.tensor_proto)
        if tag.startswith("_hparams_"):   # the run's hparams records (test_records reads them)
          continue
        if t.dtype == object:   # an image summary: [width, height, png bytes...]
          value = tf.io.decode_png(t[2]).numpy()
        else:
          value = float(t)
        out.setdefault(tag, {})[ev.step] = value
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
  # The view grid: weak, strong1, strong2 rows of 8 images of 32 px with 2 px gaps.
  grid = adapt["views/train"][0]
  assert grid.shape == (3 * 32 + 2 * 2, 8 * 32 + 7 * 2, 3)
  source = _events(runs["source"])
  assert source["views/train"][0].shape == (32, 8 * 32 + 7 * 2, 3)
  assert set(source["confusion/source"]) == {4}
  assert {f"eval/source/class_acc/{c}" for c in classes} <= set(source)


def test_confusion_image_and_grid_helpers():
  cm = np.array([[5, 1], [0, 4]])
  a = pictures.confusion_image(cm, ["a", "b"])
  b = pictures.confusion_image(np.array([[0, 6], [4, 0]]), ["a", "b"])
  assert a.dtype == np.uint8 and a.shape == b.shape and not np.array_equal(a, b)
  s = pictures.class_accuracy_scalars(
      {"tgt list": {"per_class_accuracy": np.array([0.5, np.nan])}}, ["happy", "sad face"])
  assert s["eval/tgt_list/class_acc/happy"] == 0.5
  assert np.isnan(s["eval/tgt_list/class_acc/sad_face"])
  batch = {"weak": np.full((3, 4, 5, 3), 7, np.uint8), "strong1": np.zeros((3, 4, 5, 3), np.uint8)}
  g = pictures.view_grid(batch, ["weak", "strong1"])
  assert g.shape == (4 + 2 + 4, 3 * 5 + 2 * 2, 3)
  assert (g[:4, :5] == 7).all() and (g[6:, :5] == 0).all() and (g[4:6] == 255).all()
  with pytest.raises(ValueError, match="uint8"):
    pictures.view_grid({"image": np.zeros((2, 4, 4, 3), np.float32)}, ["image"])


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


def test_feature_map_refuses_a_source_run_and_unknown_lists(runs):
  from eercl_jax import feature_map  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="name an adaptation run"):
    feature_map.feature_map(str(runs["source"]), "unused.png")
  with pytest.raises(ValueError, match="--lists"):
    feature_map.feature_map(str(runs["adapt"]), "unused.png", list_names=["tagret"])
