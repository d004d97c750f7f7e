"""read_list: parsing, every bad-input error (naming file and line), the skip switch, and the
class-order file checked by every reader of a run's lists."""
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from eercl_jax import checkpoints, config_defaults, feature_map
from eercl_jax.data import lists, run_lists
from eercl_jax.errors import DataError

CLASSES = ("angry", "disgust", "fear")


def _image(root, rel, size=8):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (size, size), (10, 20, 30)).save(path)
  return path


def _list(tmp_path, text, name="list.txt"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.fixture
def root(tmp_path):
  r = tmp_path / "fer"
  for rel in ("d/angry/0.jpg", "d/fear/1.jpg", "d/disgust/2.jpg"):
    _image(str(r), rel)
  return str(r)


def test_parses_paths_labels_and_lines(tmp_path, root):
  path = _list(tmp_path, "d/angry/0.jpg 0\n\nd/fear/1.jpg 2\nd/disgust/2.jpg 1\n\n")
  fl = lists.read_list(path, root, CLASSES)
  assert len(fl) == 3
  assert fl.paths == tuple(os.path.join(root, p) for p in
                           ("d/angry/0.jpg", "d/fear/1.jpg", "d/disgust/2.jpg"))
  assert all(os.path.isabs(p) for p in fl.paths)
  np.testing.assert_array_equal(fl.labels, [0, 2, 1])
  assert fl.labels.dtype == np.int32
  np.testing.assert_array_equal(fl.lines, [1, 3, 4])  # blank line 2 skipped, numbering kept
  assert fl.class_names == CLASSES and fl.num_skipped == 0
  np.testing.assert_array_equal(lists.count_per_class(fl), [1, 1, 1])


def test_missing_list_file(tmp_path, root):
  with pytest.raises(DataError, match="nope.txt.*not found"):
    lists.read_list(str(tmp_path / "nope.txt"), root, CLASSES)


@pytest.mark.parametrize("line, why", [
    ("d/angry/0.jpg", "expected"),             # one field
    ("d/angry/0.jpg 0 extra", "expected"),     # three fields
    ("d/angry/0.jpg  0", "expected"),          # two spaces
    ("d/angry/0.jpg zero", "not an integer"),
    ("d/angry/0.jpg 1.0", "not an integer"),
])
def test_malformed_line(tmp_path, root, line, why):
  path = _list(tmp_path, f"d/fear/1.jpg 2\n{line}\n")
  with pytest.raises(DataError, match=why) as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:2:" in str(e.value)


@pytest.mark.parametrize("label", [-1, 3, 7])
def test_label_out_of_range(tmp_path, root, label):
  path = _list(tmp_path, f"d/fear/1.jpg 2\nd/angry/0.jpg {label}\n")
  with pytest.raises(DataError, match=r"outside \[0, 3\)") as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:2:" in str(e.value)


def test_malformed_lines_are_errors_even_when_skipping(tmp_path, root):
  path = _list(tmp_path, "d/angry/0.jpg 9\n")
  with pytest.raises(DataError, match=f"{path}:1:"):
    lists.read_list(path, root, CLASSES, skip_bad_images=True)


def test_empty_list(tmp_path, root):
  path = _list(tmp_path, "\n\n")
  with pytest.raises(DataError, match="no usable entries") as e:
    lists.read_list(path, root, CLASSES)
  assert path in str(e.value)


def test_missing_image(tmp_path, root):
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/angry/gone.jpg 0\n")
  for mode in ("decode", "exists"):
    with pytest.raises(DataError, match="missing image") as e:
      lists.read_list(path, root, CLASSES, check_images=mode)
    assert f"{path}:2:" in str(e.value) and "gone.jpg" in str(e.value)
  assert len(lists.read_list(path, root, CLASSES, check_images="none")) == 2


def test_corrupt_image(tmp_path, root):
  with open(os.path.join(root, "d/angry/bad.jpg"), "wb") as f:
    f.write(b"this is not a jpeg")
  path = _list(tmp_path, "d/angry/bad.jpg 0\nd/angry/0.jpg 0\n")
  with pytest.raises(DataError, match="unreadable image") as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:1:" in str(e.value) and "bad.jpg" in str(e.value)
  # 'exists' does not open the file, so it lets the corrupt image through.
  assert len(lists.read_list(path, root, CLASSES, check_images="exists")) == 2


def test_skip_bad_images(tmp_path, root):
  with open(os.path.join(root, "d/angry/bad.jpg"), "wb") as f:
    f.write(b"\xff\xd8 truncated")
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/angry/bad.jpg 0\nd/x/gone.jpg 1\nd/fear/1.jpg 2\n")
  fl = lists.read_list(path, root, CLASSES, skip_bad_images=True)
  assert fl.num_skipped == 2
  np.testing.assert_array_equal(fl.lines, [1, 4])
  np.testing.assert_array_equal(fl.labels, [0, 2])


def test_all_skipped_is_the_empty_list_error(tmp_path, root):
  path = _list(tmp_path, "d/x/gone.jpg 0\nd/x/gone2.jpg 1\n")
  with pytest.raises(DataError, match="no usable entries.*all 2"):
    lists.read_list(path, root, CLASSES, skip_bad_images=True)


def test_bad_check_mode(tmp_path, root):
  with pytest.raises(ValueError, match="check_images"):
    lists.read_list(_list(tmp_path, "d/angry/0.jpg 0\n"), root, CLASSES, check_images="yes")


def _truncated_jpeg(root, rel):
  """A JPEG whose header is intact but whose scan data is cut: PIL's verify() accepts it."""
  full = os.path.join(root, rel)
  rng = np.random.default_rng(0)
  os.makedirs(os.path.dirname(full), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
  data = open(full, "rb").read()
  with open(full, "wb") as f:
    f.write(data[:len(data) // 2])
  with Image.open(full) as im:
    im.verify()                       # the old check passed this file
  return full


def test_a_truncated_jpeg_fails_the_decode_check_and_can_be_skipped(tmp_path, root):
  _truncated_jpeg(root, "d/angry/cut.jpg")
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/angry/cut.jpg 0\n")
  with pytest.raises(DataError, match="unreadable image.*truncated") as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:2:" in str(e.value) and "cut.jpg" in str(e.value)
  fl = lists.read_list(path, root, CLASSES, skip_bad_images=True)
  assert len(fl) == 1 and fl.num_skipped == 1


def test_sixteen_bit_png_is_scaled_and_float_images_are_refused(tmp_path):
  from eercl_jax.data import images  # pylint: disable=import-outside-toplevel
  wide = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
  path = str(tmp_path / "wide.png")
  Image.fromarray(wide).save(path)
  with Image.open(path) as im:
    assert im.mode.startswith("I")   # Pillow keeps 16 bits; its convert('RGB') would clip
  img = images.load_image(path)
  want = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
  assert img.shape == (2, 3, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[..., 0], want)
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  fpath = str(tmp_path / "float.tiff")
  Image.fromarray(np.ones((4, 4), np.float32) * 0.5).save(fpath)
  with pytest.raises(DataError, match="float.tiff.*floating-point image"):
    images.load_image(fpath)


def test_list_hygiene_bom_paths_labels_duplicates(tmp_path, root, monkeypatch):
  bom = tmp_path / "bom.txt"
  bom.write_bytes("d/angry/0.jpg 0\nd/fear/1.jpg 2\n".encode("utf-8-sig"))
  assert len(lists.read_list(str(bom), root, CLASSES)) == 2   # the BOM is not part of a path
  _image(str(tmp_path), "outside.jpg")
  for line in ("../outside.jpg 0", "d/../../outside.jpg 0",
               f"{os.path.join(root, 'd/angry/0.jpg')} 0"):
    path = _list(tmp_path, f"d/fear/1.jpg 2\n{line}\n", name="escape.txt")
    with pytest.raises(DataError, match="leaves the image root") as e:
      lists.read_list(path, root, CLASSES)
    assert f"{path}:2:" in str(e.value)
    assert len(lists.read_list(path, root, CLASSES, allow_outside_root=True)) == 2
  for label in ("+2", "02x", "２"):
    path = _list(tmp_path, f"d/fear/1.jpg {label}\n", name="label.txt")
    with pytest.raises(DataError, match=f"{path}:1:"):
      lists.read_list(path, root, CLASSES)
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/fear/1.jpg 2\nd/angry/0.jpg 0\n", name="dup.txt")
  warned = []
  monkeypatch.setattr(lists.logging, "warning", lambda msg, *a: warned.append(msg % a))
  assert len(lists.read_list(path, root, CLASSES)) == 3
  # (the other warning: the list has no class-order file)
  duplicates = [w for w in warned if "duplicate" in w]
  assert len(duplicates) == 1
  assert "1 duplicate entries" in duplicates[0] and "line 3 repeats line 1" in duplicates[0]


# ------------------------------------------------------------------------------ class order

ENTRIES = [("d/angry/0.jpg", 0), ("d/fear/1.jpg", 2), ("d/disgust/2.jpg", 1)]


def _warnings(monkeypatch):
  warned = []
  monkeypatch.setattr(lists.logging, "warning", lambda msg, *a: warned.append(msg % a))
  return warned


def test_class_order_file_is_written_and_checked_by_name(tmp_path, root):
  path = str(tmp_path / "list.txt")
  lists.write_list(path, ENTRIES, CLASSES)
  assert open(path).read() == "d/angry/0.jpg 0\nd/fear/1.jpg 2\nd/disgust/2.jpg 1\n"  # unchanged
  doc = json.load(open(lists.classes_path(path)))
  assert lists.classes_path(path) == path + ".classes.json"
  assert doc["class_names"] == list(CLASSES) and doc["count"] == 3 and len(doc["sha256"]) == 64
  assert len(lists.read_list(path, root, CLASSES)) == 3
  # The same names in another order: refused, naming both orders and where they come from.
  with pytest.raises(DataError, match=re.escape(
      f"{path}: labels index (angry, disgust, fear) (its class-order file {path}.classes.json) "
      "but config.data.class_names is (fear, angry, disgust): the same names in another order")):
    lists.read_list(path, root, ("fear", "angry", "disgust"), names_from="config.data.class_names")
  # Other names (and more of them: named as such, not as a label out of range).
  with pytest.raises(DataError, match=r"labels index \(angry, disgust, fear\) .* but class_names "
                                      r"is \(angry, disgust, sad, happy\) \(only the list has "
                                      r"\(fear\); only class_names has \(sad, happy\)\)"):
    lists.read_list(path, root, ("angry", "disgust", "sad", "happy"))
  lists.write_classes(path, CLASSES + ("happy",))
  with pytest.raises(DataError, match=r"labels index \(angry, disgust, fear, happy\)"):
    lists.read_list(path, root, CLASSES)
  # A hand-written file holding only the names is enough; a malformed one is named.
  (tmp_path / "list.txt.classes.json").write_text('{"class_names": ["angry", "disgust", "fear"]}')
  assert len(lists.read_list(path, root, CLASSES)) == 3
  (tmp_path / "list.txt.classes.json").write_text('{"classes": ["angry"]}')
  with pytest.raises(DataError, match=r"list.txt.classes.json: a class-order file holds"):
    lists.read_list(path, root, CLASSES)
  (tmp_path / "list.txt.classes.json").write_text('["angry"')
  with pytest.raises(DataError, match=r"list.txt.classes.json: unreadable class-order file"):
    lists.read_list(path, root, CLASSES)


def test_a_list_without_class_order_file_reads_with_one_warning(tmp_path, root, monkeypatch):
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/fear/1.jpg 2\n", name="bare.txt")
  warned = _warnings(monkeypatch)
  for _ in range(2):
    assert len(lists.read_list(path, root, CLASSES, names_from="config.data.class_names")) == 2
  assert warned == [f"{path} has no class-order file (bare.txt.classes.json); its labels are "
                    "taken to index config.data.class_names (angry, disgust, fear) (make_lists "
                    "writes one beside each list; docs/data.md#class-order-files)"]


def test_an_edited_list_keeps_its_class_order_with_a_warning(tmp_path, root, monkeypatch):
  path = str(tmp_path / "edited.txt")
  lists.write_list(path, ENTRIES, CLASSES)
  warned = _warnings(monkeypatch)
  with open(path, "a") as f:
    f.write("\r\n")     # line endings and blank lines are not edits
  assert len(lists.read_list(path, root, CLASSES)) == 3 and not warned
  with open(path, "w") as f:
    f.write("d/angry/0.jpg 0\n")
  assert len(lists.read_list(path, root, CLASSES)) == 1
  assert len(warned) == 1 and "changed since its class-order file" in warned[0] and \
      "(3 entries then, 1 now)" in warned[0]
  with pytest.raises(DataError, match="the same names in another order"):
    lists.read_list(path, root, ("fear", "angry", "disgust"))


def _run_data(root, train, evals):
  d = config_defaults.source_config().data
  d.image_root, d.class_names = root, ("fear", "angry", "disgust")
  d.train_list, d.eval_lists = train, evals
  return d


def test_run_lists_refuse_a_list_of_another_class_order(tmp_path, root):
  good, other = str(tmp_path / "good.txt"), str(tmp_path / "other.txt")
  lists.write_list(good, [(p, ("fear", "angry", "disgust").index(CLASSES[l])) for p, l in ENTRIES],
                   ("fear", "angry", "disgust"))
  lists.write_list(other, ENTRIES, CLASSES)
  train, evals = run_lists.read_run_lists(_run_data(root, good, {"target": good}))
  np.testing.assert_array_equal(train.labels, [1, 0, 2])
  match = re.escape(f"{other}: labels index (angry, disgust, fear)") + \
      r".* but config\.data\.class_names is \(fear, angry, disgust\)"
  with pytest.raises(DataError, match=match):
    run_lists.read_run_lists(_run_data(root, other, {"target": good}))
  with pytest.raises(DataError, match=match):
    run_lists.read_run_lists(_run_data(root, good, {"target": good, "source": other}))


def test_feature_map_refuses_an_evaluation_list_of_another_class_order(tmp_path, root,
                                                                        monkeypatch):
  other = str(tmp_path / "other.txt")
  lists.write_list(other, ENTRIES, CLASSES)
  c = config_defaults.adapt_config("expw")
  c.data.image_root, c.data.class_names = root, ("fear", "angry", "disgust")
  c.data.eval_lists = {"target": other}
  meta = {"stage": "adapt", "config": c.to_dict(), "class_names": list(c.data.class_names)}
  monkeypatch.setattr(checkpoints, "resolve_run_dir", lambda path, *a, **k: path)
  monkeypatch.setattr(checkpoints, "read_meta", lambda path: (1, meta))
  monkeypatch.setattr(checkpoints, "check_model_meta", lambda *a: None)
  match = re.escape(f"{other}: labels index (angry, disgust, fear)") + \
      r".* but the run's config\.data\.class_names is \(fear, angry, disgust\)"
  with pytest.raises(DataError, match=match):
    feature_map.feature_map("adapt_run", str(tmp_path / "map.png"), source_run="source_run")
