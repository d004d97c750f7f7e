"""make_lists: miniature fake copies of each data set's own layout and label files, built here
with Pillow, go through the CLI entry; the lists must read back through `lists.read_list` with
each data set's native labels mapped to the class names, and every bad input must name its file
and line."""
import os
import re
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest

from eercl_jax import config_defaults
from eercl_jax.data import lists, run_lists
from eercl_jax.tools import make_lists
from eercl_jax.errors import DataError
from tests.conftest import REPO

CLASSES = config_defaults.FER_CLASSES      # angry disgust fear happy neutral sad surprise
RAF_ORDER = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")


def _img(path, size=(12, 10), mode="RGB", smooth=False):
  """A small image; `smooth`: gradients, so a JPEG keeps the pixels within a few levels."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
  if smooth:
    y, x = np.mgrid[:size[1], :size[0]]
    arr = np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)
  else:
    arr = np.random.default_rng(zlib.crc32(path.encode())).integers(0, 256, shape, np.uint8)
  Image.fromarray(arr, mode).save(path, quality=95) if path.endswith(".jpg") else \
      Image.fromarray(arr, mode).save(path)
  return arr


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def _run(tmp_path, *argv):
  """main() with the image root and lists folder of this test; returns {list name: FerList}."""
  root, lists_dir = tmp_path / "fer", tmp_path / "txt"
  assert make_lists.main([*argv, "--image_root", str(root), "--lists_dir", str(lists_dir)]) == 0
  return root, lists_dir


def _read(lists_dir, root, name, classes=CLASSES):
  fl = lists.read_list(str(lists_dir / name), str(root), classes, check_images="decode")
  return {os.path.relpath(p, root): int(l) for p, l in zip(fl.paths, fl.labels)}


# ------------------------------------------------------------------------------ fake data sets

RAF_LINES = ["train_00001.jpg 1", "train_00002.jpg 6", "train_00003.jpg 7", "test_0001.jpg 4",
             "test_0002.jpg 2"]


def fake_raf(root, lines=RAF_LINES, skip_image=None, inside=""):
  """RAF-DB basic under root/raf (`inside='basic'`: as the archive unpacks, in basic/)."""
  d = root / "raf" / inside if inside else root / "raf"
  _write(str(d / "EmoLabel" / "list_patition_label.txt"), "\n".join(lines) + "\n")
  for line in lines:
    name = line.split()[0]
    if name == skip_image:
      continue
    stem = os.path.splitext(name)[0]
    _img(str(d / "Image" / "aligned" / f"{stem}_aligned.jpg"))
    _img(str(d / "Image" / "original" / name))
  return d


def fake_fer2013(root, rows=None):
  rng = np.random.default_rng(0)
  rows = rows or [(0, "Training"), (4, "Training"), (6, "PublicTest"), (5, "PrivateTest"),
                  (3, "PrivateTest")]
  pixels = [rng.integers(0, 256, 48 * 48) for _ in rows]
  text = "emotion,pixels,Usage\n" + "".join(
      f"{e},{' '.join(map(str, p))},{u}\n" for (e, u), p in zip(rows, pixels))
  _write(str(root / "fer2013" / "fer2013.csv"), text)
  return root / "fer2013", pixels


def fake_expw(root, lines=None):
  d = root / "expw"
  origins = {"a.jpg": _img(str(d / "image" / "origin" / "a.jpg"), (40, 30), smooth=True),
             "b.jpg": _img(str(d / "image" / "origin" / "b.jpg"), (20, 20), smooth=True)}
  # image face_id top left right bottom confidence label
  lines = lines or ["a.jpg 0 2 3 13 12 55.2 3",     # happy, box 10x10 at (3, 2)
                    "a.jpg 1 20 25 45 40 40.0 4",   # sad, box past the right/bottom edge: clipped
                    "b.jpg 0 0 0 8 8 61.0 6"]       # neutral
  _write(str(d / "label" / "label.lst"), "\n".join(lines) + "\n")
  return d, origins


def fake_ck(root):
  d = root / "ck"
  for seq, n in (("S005/001", 5), ("S010/002", 4), ("S011/001", 3)):
    for k in range(1, n + 1):
      s, q = seq.split("/")
      _img(str(d / "cohn-kanade-images" / s / q / f"{s}_{q}_{k:08d}.png"), mode="L")
  _write(str(d / "Emotion/S005/001/S005_001_00000005_emotion.txt"), "   3.0000000e+00\n")
  _write(str(d / "Emotion/S010/002/S010_002_00000004_emotion.txt"), "   2.0000000e+00\n")
  # S011/001 has no emotion file: unlabelled, not listed.
  return d


def fake_jaffe(root):
  d = root / "jaffe"
  for name in ("KA.AN1.39.tiff", "KA.HA2.30.tiff", "YM.SU3.60.tiff", "NA.NE1.202.tiff"):
    _img(str(d / name), mode="L")
  _write(str(d / "README.txt"), "not an image\n")
  return d


def fake_sfew(root):
  d = root / "sfew"
  for rel in ("Train/Angry/a_1.png", "Train/Happy/h_1.png", "Train/Happy/h_2.png",
              "Val/Surprise/s_1.png", "Val/Neutral/n_1.png"):
    _img(str(d / rel))
  return d


AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,"
                    "facial_landmarks,expression,valence,arousal\n")


def fake_affectnet(root):
  d = root / "affectnet"
  train = [("1/a.jpg", 0), ("1/b.jpg", 6), ("2/c.jpg", 7), ("2/d.jpg", 8), ("2/e.jpg", 10),
           ("3/f.jpg", 1)]
  val = [("4/g.jpg", 3), ("4/h.jpg", 9), ("4/i.jpg", 5)]
  for rel, _ in train + val:
    _img(str(d / "Manually_Annotated_Images" / rel), (30, 30))
  row = lambda rel, e: f'{rel},5,6,16,18,"1.0;2.0;3.0",{e},0.1,-0.2\n'
  _write(str(d / "Manually_Annotated_file_lists" / "training.csv"),
         AFFECTNET_HEADER + "".join(row(*r) for r in train))
  _write(str(d / "Manually_Annotated_file_lists" / "validation.csv"),   # no header, as shipped
         "".join(row(*r) for r in val))
  return d


# ------------------------------------------------------------------------------ each data set

def test_raf_native_labels_mapped_to_class_names(tmp_path):
  d = fake_raf(tmp_path / "fer")
  root, out = _run(tmp_path, "raf", "--src", str(d))
  train = _read(out, root, "labeled_source_images_raf.txt")
  # RAF-DB 1 = surprise, 6 = angry, 7 = neutral; 4 = happy, 2 = fear.
  assert train == {"raf/Image/aligned/train_00001_aligned.jpg": CLASSES.index("surprise"),
                   "raf/Image/aligned/train_00002_aligned.jpg": CLASSES.index("angry"),
                   "raf/Image/aligned/train_00003_aligned.jpg": CLASSES.index("neutral")}
  test = _read(out, root, "unlabeled_target_images_raf_0.txt")
  assert test == {"raf/Image/aligned/test_0001_aligned.jpg": CLASSES.index("happy"),
                  "raf/Image/aligned/test_0002_aligned.jpg": CLASSES.index("fear")}
  assert _read(out, root, "train_images_raf.txt") == train
  assert _read(out, root, "test_images_raf.txt") == test
  table = (out / "counts_raf.md").read_text()
  assert "| class | train | test | total |" in table
  assert "| surprise | 1 | 0 | 1 |" in table and "| happy | 0 | 1 | 1 |" in table
  assert "| **total** | 3 | 2 | 5 |" in table


def test_raf_in_its_native_order_and_original_images(tmp_path):
  d = fake_raf(tmp_path / "fer")
  root, out = _run(tmp_path, "raf", "--src", str(d), "--raf_images", "original",
                   "--class_names", ",".join(RAF_ORDER))
  train = _read(out, root, "labeled_source_images_raf.txt", RAF_ORDER)
  assert train == {"raf/Image/original/train_00001.jpg": 0,     # native label - 1
                   "raf/Image/original/train_00002.jpg": 5,
                   "raf/Image/original/train_00003.jpg": 6}


def test_every_list_carries_its_class_order(tmp_path):
  """Each list written has its class-order file; a run with another class order refuses the
  lists by name (the list built in RAF-DB's order scored 19% under the default order)."""
  d = fake_raf(tmp_path / "fer")
  root, out = _run(tmp_path, "raf", "--src", str(d), "--class_names", ",".join(RAF_ORDER))
  written = sorted(p.name for p in out.glob("*.txt"))
  assert written == ["labeled_source_images_raf.txt", "test_images_raf.txt",
                     "train_images_raf.txt", "unlabeled_target_images_raf_0.txt"]
  for name in written:
    assert lists.read_classes(str(out / name))["class_names"] == RAF_ORDER, name
  assert sorted(p.name for p in out.glob("*.classes.json")) == \
      [f"{n}.classes.json" for n in written]
  assert "`<list>.classes.json`" in (out / "counts_raf.md").read_text()
  data = config_defaults.source_config("raf", "raf").data
  data.image_root = str(root)
  data.train_list = str(out / "labeled_source_images_raf.txt")
  data.eval_lists = {"target": str(out / "unlabeled_target_images_raf_0.txt")}
  with pytest.raises(DataError, match=r"labeled_source_images_raf.txt: labels index \(surprise, "
                                      r"fear, .* but config\.data\.class_names is \(angry, "
                                      r"disgust, .*: the same names in another order"):
    run_lists.read_run_lists(data)
  data.class_names = RAF_ORDER
  train, _ = run_lists.read_run_lists(data)
  assert len(train) == 3


def test_raf_as_the_archive_unpacks_in_basic(tmp_path):
  d = fake_raf(tmp_path / "fer", inside="basic")
  for src in (d.parent, d):     # the folder holding basic/, and basic/ itself
    root, out = _run(tmp_path, "raf", "--src", str(src))
    assert _read(out, root, "labeled_source_images_raf.txt") == {
        "raf/basic/Image/aligned/train_00001_aligned.jpg": CLASSES.index("surprise"),
        "raf/basic/Image/aligned/train_00002_aligned.jpg": CLASSES.index("angry"),
        "raf/basic/Image/aligned/train_00003_aligned.jpg": CLASSES.index("neutral")}


def test_raf_wrong_src_says_where_to_point_it(tmp_path, monkeypatch, capsys):
  fake_raf(tmp_path / "fer", inside="basic")
  wrong = tmp_path / "fer" / "raf" / "basic" / "Image"
  _error(tmp_path, ["raf", "--src", str(wrong)], re.escape(
      f"RAF-DB label file not found: looked for {wrong}/EmoLabel/list_patition_label.txt and "
      f"{wrong}/basic/EmoLabel/list_patition_label.txt; point --src at the folder that holds "
      "the archive's basic/ (or at basic/ itself)"))
  monkeypatch.setattr(sys, "argv", ["make_lists", "raf", "--src", str(tmp_path / "nowhere"),
                                    "--image_root", str(tmp_path / "fer"), "--lists_dir",
                                    str(tmp_path / "t")])
  with pytest.raises(SystemExit) as exit_:
    make_lists.run()
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error: RAF-DB label file not found: looked for "
                                            f"{tmp_path / 'nowhere'}/EmoLabel/")
  assert f"({tmp_path / 'nowhere'} does not exist); point --src at" in err


def test_fer2013_rows_written_losslessly_per_usage(tmp_path):
  d, pixels = fake_fer2013(tmp_path / "fer")
  root, out = _run(tmp_path, "fer2013", "--src", str(d / "fer2013.csv"))
  train = _read(out, root, "train_images_fer2013.txt")
  assert train == {"fer2013/train/angry/00000.png": CLASSES.index("angry"),
                   "fer2013/train/sad/00001.png": CLASSES.index("sad")}   # FER2013 4 = sad
  assert _read(out, root, "publictest_images_fer2013.txt") == {
      "fer2013/publictest/neutral/00002.png": CLASSES.index("neutral")}   # 6 = neutral
  target = _read(out, root, "unlabeled_target_images_fer2013_0.txt")
  assert target == {"fer2013/privatetest/surprise/00003.png": CLASSES.index("surprise"),
                    "fer2013/privatetest/happy/00004.png": CLASSES.index("happy")}
  assert _read(out, root, "labeled_source_images_fer2013.txt") == train
  got = np.asarray(Image.open(root / "fer2013/publictest/neutral/00002.png"))
  np.testing.assert_array_equal(got, pixels[2].reshape(48, 48))
  assert "| **total** | 2 | 1 | 2 | 5 |" in (out / "counts_fer2013.md").read_text()


def test_fer2013_all_splits_as_target(tmp_path):
  d, _ = fake_fer2013(tmp_path / "fer")
  root, out = _run(tmp_path, "fer2013", "--src", str(d), "--target_splits", "all")
  assert len(_read(out, root, "unlabeled_target_images_fer2013_0.txt")) == 5


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_expw_faces_cropped_and_clipped(tmp_path, fmt):
  d, origins = fake_expw(tmp_path / "fer")
  root, out = _run(tmp_path, "expw", "--src", str(d), "--crop_format", fmt)
  faces = _read(out, root, "unlabeled_target_images_expw_0.txt")
  assert faces == {f"expw/faces/happy/a_0.{fmt}": CLASSES.index("happy"),    # ExpW 3 = happy
                   f"expw/faces/sad/a_1.{fmt}": CLASSES.index("sad"),        # 4 = sad
                   f"expw/faces/neutral/b_0.{fmt}": CLASSES.index("neutral")}  # 6 = neutral
  assert _read(out, root, "labeled_source_images_expw.txt") == faces
  crop = np.asarray(Image.open(root / f"expw/faces/happy/a_0.{fmt}"))
  clipped = np.asarray(Image.open(root / f"expw/faces/sad/a_1.{fmt}"))
  assert crop.shape == (10, 10, 3) and clipped.shape == (10, 15, 3)  # rows 20..30, cols 25..40
  # The origin is a JPEG: compare with its decoded pixels (exactly for PNG crops).
  decoded = np.asarray(Image.open(d / "image/origin/a.jpg").convert("RGB")).astype(float)
  tol = 0 if fmt == "png" else 12
  np.testing.assert_allclose(crop, decoded[2:12, 3:13], atol=tol)
  np.testing.assert_allclose(clipped, decoded[20:30, 25:40], atol=tol)
  assert origins["a.jpg"].shape == (30, 40, 3)


def test_ck_peak_frames_first_frame_neutral_contempt_dropped(tmp_path):
  d = fake_ck(tmp_path / "fer")
  root, out = _run(tmp_path, "ck", "--src", str(d))
  seq = "ck/cohn-kanade-images/S005/001/S005_001_"
  assert _read(out, root, "unlabeled_target_images_ck_0.txt") == {
      f"{seq}00000001.png": CLASSES.index("neutral"),
      **{f"{seq}{k:08d}.png": CLASSES.index("disgust") for k in (3, 4, 5)}}   # CK+ 3 = disgust
  table = (out / "counts_ck.md").read_text()
  assert "left out: 1 x contempt" in table
  assert "left out: 1 x sequence without an emotion label" in table


def test_ck_options_and_contempt_kept(tmp_path):
  d = fake_ck(tmp_path / "fer")
  eight = CLASSES + ("contempt",)
  root, out = _run(tmp_path, "ck", "--src", str(d), "--ck_peak_frames", "2", "--ck_neutral",
                   "none", "--keep_contempt", "--class_names", ",".join(eight))
  got = _read(out, root, "unlabeled_target_images_ck_0.txt", eight)
  assert got == {"ck/cohn-kanade-images/S005/001/S005_001_00000004.png": 1,
                 "ck/cohn-kanade-images/S005/001/S005_001_00000005.png": 1,
                 "ck/cohn-kanade-images/S010/002/S010_002_00000003.png": 7,
                 "ck/cohn-kanade-images/S010/002/S010_002_00000004.png": 7}
  with pytest.raises(DataError, match="contempt.*class_names"):
    _run(tmp_path, "ck", "--src", str(d), "--keep_contempt")


def test_jaffe_labels_from_file_names(tmp_path):
  d = fake_jaffe(tmp_path / "fer")
  root, out = _run(tmp_path, "jaffe", "--src", str(d))
  assert _read(out, root, "unlabeled_target_images_jaffe_0.txt") == {
      "jaffe/KA.AN1.39.tiff": CLASSES.index("angry"), "jaffe/KA.HA2.30.tiff": 3,
      "jaffe/NA.NE1.202.tiff": 4, "jaffe/YM.SU3.60.tiff": 6}


def test_affectnet_skips_non_expressions_and_contempt(tmp_path):
  d = fake_affectnet(tmp_path / "fer")
  root, out = _run(tmp_path, "affectnet", "--src", str(d))
  img = "affectnet/Manually_Annotated_Images/"
  assert _read(out, root, "labeled_source_images_affectnet.txt") == {
      f"{img}1/a.jpg": CLASSES.index("neutral"), f"{img}1/b.jpg": CLASSES.index("angry"),
      f"{img}3/f.jpg": CLASSES.index("happy")}
  assert _read(out, root, "unlabeled_target_images_affectnet_0.txt") == {
      f"{img}4/g.jpg": CLASSES.index("surprise"), f"{img}4/i.jpg": CLASSES.index("disgust")}
  table = (out / "counts_affectnet.md").read_text()
  for note in ("1 x contempt", "1 x label 8 (none)", "1 x label 9 (uncertain)",
               "1 x label 10 (no-face)"):
    assert note in table


def test_affectnet_eight_classes_and_crops(tmp_path):
  d = fake_affectnet(tmp_path / "fer")
  eight = CLASSES + ("contempt",)
  root, out = _run(tmp_path, "affectnet", "--src", str(d), "--keep_contempt", "--class_names",
                   ",".join(eight), "--affectnet_crop")
  train = _read(out, root, "train_images_affectnet.txt", eight)
  assert train["affectnet/faces/train/contempt/2_c.jpg"] == 7
  assert np.asarray(Image.open(root / "affectnet/faces/train/contempt/2_c.jpg")).shape == \
      (18, 16, 3)


def test_sfew_and_folder_trees_with_aliases(tmp_path):
  d = fake_sfew(tmp_path / "fer")
  root, out = _run(tmp_path, "sfew", "--src", str(d))
  assert _read(out, root, "labeled_source_images_sfew.txt") == {
      "sfew/Train/Angry/a_1.png": 0, "sfew/Train/Happy/h_1.png": 3, "sfew/Train/Happy/h_2.png": 3}
  assert _read(out, root, "unlabeled_target_images_sfew_0.txt") == {
      "sfew/Val/Neutral/n_1.png": 4, "sfew/Val/Surprise/s_1.png": 6}

  tree = tmp_path / "fer" / "mine"
  for rel in ("train/Anger/1.png", "train/happiness/x/2.png", "test/SADNESS/3.png",
              "test/surprised/4.png", "test/Neutrality/6.png", "test/Contempt/5.png"):
    _img(str(tree / rel))
  root, out = _run(tmp_path, "folder", "--domain", "mine", "--split_dirs", "train=train",
                   "test=test")
  assert _read(out, root, "labeled_source_images_mine.txt") == {
      "mine/train/Anger/1.png": 0, "mine/train/happiness/x/2.png": 3}
  assert _read(out, root, "unlabeled_target_images_mine_0.txt") == {
      "mine/test/SADNESS/3.png": 5, "mine/test/surprised/4.png": 6,
      "mine/test/Neutrality/6.png": 4}
  assert "left out: 1 x contempt" in (out / "counts_mine.md").read_text()


def test_default_names_are_what_the_configs_read(tmp_path, monkeypatch):
  """Run from a project folder with the defaults: the lists land where the configs look."""
  monkeypatch.chdir(tmp_path)
  fake_raf(tmp_path / "data" / "fer", inside="basic")    # the archive unpacked at data/fer/raf
  fake_jaffe(tmp_path / "data" / "fer")
  assert make_lists.main(["raf"]) == 0
  assert make_lists.main(["jaffe", "--config", os.path.join(REPO, "configs", "adapt_jaffe.py")]) \
      == 0
  for config in (config_defaults.source_config("raf", "jaffe"),
                 config_defaults.adapt_config("jaffe", "raf")):
    d = config.data
    for path in (d.train_list, *d.eval_lists.values()):
      assert len(lists.read_list(path, d.image_root, d.class_names)) > 0, path


# ------------------------------------------------------------------------------ errors

def _error(tmp_path, argv, match):
  with pytest.raises(DataError, match=match):
    _run(tmp_path, *argv)


def test_error_unknown_folder(tmp_path):
  d = fake_sfew(tmp_path / "fer")
  _img(str(d / "Train" / "Happpy" / "x.png"))
  _error(tmp_path, ["sfew", "--src", str(d)], r"Train/Happpy: unknown class folder 'Happpy'")


def test_error_image_outside_class_folders(tmp_path):
  d = fake_sfew(tmp_path / "fer")
  _img(str(d / "Val" / "stray.png"))
  _error(tmp_path, ["sfew", "--src", str(d)], r"Val/stray.png: image outside any class folder")


@pytest.mark.parametrize("line, match", [
    ("train_00004.jpg 8", r"list_patition_label.txt:6: label 8 is not one of"),   # unmapped
    ("train_00004.jpg 0", r"list_patition_label.txt:6: label 0 is not one of"),
    ("train_00004.jpg", r"list_patition_label.txt:6: expected"),                 # malformed
    ("train_00004.jpg five", r"list_patition_label.txt:6: label 'five' is not an integer"),
    ("val_00004.jpg 1", r"list_patition_label.txt:6: file name 'val_00004.jpg'"),
    ("train_00001.jpg 1", r"list_patition_label.txt:6: duplicate of .*list_patition_label.txt:1"),
])
def test_error_raf_label_file(tmp_path, line, match):
  d = fake_raf(tmp_path / "fer", RAF_LINES + [line])
  _error(tmp_path, ["raf", "--src", str(d)], match)


def test_error_missing_image_and_skip_missing(tmp_path):
  d = fake_raf(tmp_path / "fer", skip_image="test_0002.jpg")
  _error(tmp_path, ["raf", "--src", str(d)],
         r"list_patition_label.txt:5: missing image .*test_0002_aligned.jpg")
  root, out = _run(tmp_path, "raf", "--src", str(d), "--skip_missing")
  assert len(_read(out, root, "test_images_raf.txt")) == 1
  assert "left out: 1 x missing image" in (out / "counts_raf.md").read_text()


@pytest.mark.parametrize("line, match", [
    ("b.jpg 1 5 9 4 12 50.0 2", r"label.lst:4: empty face box"),          # right <= left
    ("b.jpg 1 30 2 9 40 50.0 2", r"label.lst:4: face box .* outside the 20x20 image"),
    ("b.jpg 1 5 2 9 12 50.0", r"label.lst:4: expected 8 fields"),
    ("b.jpg 1 5 2 9 12 50.0 7", r"label.lst:4: label 7 is not one of"),
    ("c.jpg 0 5 2 9 12 50.0 1", r"label.lst:4: missing image .*origin/c.jpg"),
    ("b.jpg 0 1 1 9 9 50.0 1", r"label.lst:4: duplicate of .*label.lst:3"),
])
def test_error_expw_label_file(tmp_path, line, match):
  d, _ = fake_expw(tmp_path / "fer")
  lines = (d / "label" / "label.lst").read_text().splitlines()
  _write(str(d / "label" / "label.lst"), "\n".join(lines + [line]) + "\n")
  _error(tmp_path, ["expw", "--src", str(d)], match)


@pytest.mark.parametrize("rows, match", [
    ([(1, "Training")] * 2 + [(9, "Training")], r"fer2013.csv:4: label 9 is not one of"),
    ([(1, "Training"), (1, "Testing")], r"fer2013.csv:3: Usage 'Testing'"),
])
def test_error_fer2013_rows(tmp_path, rows, match):
  d, _ = fake_fer2013(tmp_path / "fer", rows)
  _error(tmp_path, ["fer2013", "--src", str(d)], match)


@pytest.mark.parametrize("pixels, match", [
    ("1 2 3", r"fer2013.csv:2: expected 2304 grey values, got 3"),
    ("1 2 x" + " 1" * 2301, r"fer2013.csv:2: pixels are not space-separated integers"),
    ("256" + " 1" * 2303, r"fer2013.csv:2: grey values outside 0..255"),
])
def test_error_fer2013_pixels(tmp_path, pixels, match):
  d = tmp_path / "fer" / "fer2013"
  _write(str(d / "fer2013.csv"), f"emotion,pixels,Usage\n0,{pixels},Training\n")
  _error(tmp_path, ["fer2013", "--src", str(d)], match)


def test_error_ck_label_and_jaffe_code(tmp_path):
  d = fake_ck(tmp_path / "fer")
  _write(str(d / "Emotion/S005/001/S005_001_00000005_emotion.txt"), "\n  9.0000000e+00\n")
  _error(tmp_path, ["ck", "--src", str(d)], r"S005_001_00000005_emotion.txt:2: label 9")
  _write(str(d / "Emotion/S005/001/S005_001_00000005_emotion.txt"), "three\n")
  _error(tmp_path, ["ck", "--src", str(d)], r"_emotion.txt:1: label 'three' is not a number")
  j = fake_jaffe(tmp_path / "fer")
  _img(str(j / "KA.XX1.40.tiff"), mode="L")
  _error(tmp_path, ["jaffe", "--src", str(j)], r"KA.XX1.40.tiff: unknown expression code 'XX'")


def test_error_affectnet_row_and_unknown_class_name(tmp_path):
  d = fake_affectnet(tmp_path / "fer")
  with open(d / "Manually_Annotated_file_lists" / "training.csv", "a", encoding="utf-8") as f:
    f.write("5/z.jpg,1,1,2,2,\"\",11,0,0\n")
  _error(tmp_path, ["affectnet", "--src", str(d)], r"training.csv:8: label 11 is not one of")
  _error(tmp_path, ["jaffe", "--src", str(fake_jaffe(tmp_path / "fer")), "--class_names",
                    "angry,disgust,fear,happy,neutral,sad"],
         r"YM.SU3.60.tiff: class 'surprise' is not one of class_names")


def test_error_data_set_outside_the_image_root(tmp_path):
  d = fake_jaffe(tmp_path / "elsewhere")
  _error(tmp_path, ["jaffe", "--src", str(d)], r"outside the image root .*ln -s")


def test_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
  d = fake_sfew(tmp_path / "fer")
  _img(str(d / "Train" / "Happpy" / "x.png"))
  monkeypatch.setattr(sys, "argv", ["make_lists", "sfew", "--src", str(d), "--image_root",
                                    str(tmp_path / "fer"), "--lists_dir", str(tmp_path / "t")])
  with pytest.raises(SystemExit) as exit_:
    make_lists.run()
  assert exit_.value.code == 2      # a user mistake
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "Happpy" in err and "\n" not in err


def test_module_runs_as_a_command(tmp_path):
  d = fake_sfew(tmp_path / "fer")
  out = subprocess.run(
      [sys.executable, "-m", "eercl_jax.data.make_lists", "sfew", "--src", str(d),
       "--image_root", str(tmp_path / "fer"), "--lists_dir", str(tmp_path / "txt")],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert "| **total** | 3 | 2 | 5 |" in out.stdout
  assert _read(tmp_path / "txt", tmp_path / "fer", "unlabeled_target_images_sfew_0.txt")
