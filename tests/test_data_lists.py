"""read_list: parsing, every bad-input error (naming file and line), and the skip switch."""
import os

import numpy as np
from PIL import Image
import pytest

from eercl_jax.data import lists

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
  with pytest.raises(lists.DataError, match="nope.txt.*not found"):
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
  with pytest.raises(lists.DataError, match=why) as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:2:" in str(e.value)


@pytest.mark.parametrize("label", [-1, 3, 7])
def test_label_out_of_range(tmp_path, root, label):
  path = _list(tmp_path, f"d/fear/1.jpg 2\nd/angry/0.jpg {label}\n")
  with pytest.raises(lists.DataError, match=r"outside \[0, 3\)") as e:
    lists.read_list(path, root, CLASSES)
  assert f"{path}:2:" in str(e.value)


def test_malformed_lines_are_errors_even_when_skipping(tmp_path, root):
  path = _list(tmp_path, "d/angry/0.jpg 9\n")
  with pytest.raises(lists.DataError, match=f"{path}:1:"):
    lists.read_list(path, root, CLASSES, skip_bad_images=True)


def test_empty_list(tmp_path, root):
  path = _list(tmp_path, "\n\n")
  with pytest.raises(lists.DataError, match="no usable entries") as e:
    lists.read_list(path, root, CLASSES)
  assert path in str(e.value)


def test_missing_image(tmp_path, root):
  path = _list(tmp_path, "d/angry/0.jpg 0\nd/angry/gone.jpg 0\n")
  for mode in ("decode", "exists"):
    with pytest.raises(lists.DataError, match="missing image") as e:
      lists.read_list(path, root, CLASSES, check_images=mode)
    assert f"{path}:2:" in str(e.value) and "gone.jpg" in str(e.value)
  assert len(lists.read_list(path, root, CLASSES, check_images="none")) == 2


def test_corrupt_image(tmp_path, root):
  with open(os.path.join(root, "d/angry/bad.jpg"), "wb") as f:
    f.write(b"this is not a jpeg")
  path = _list(tmp_path, "d/angry/bad.jpg 0\nd/angry/0.jpg 0\n")
  with pytest.raises(lists.DataError, match="unreadable image") as e:
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
  with pytest.raises(lists.DataError, match="no usable entries.*all 2"):
    lists.read_list(path, root, CLASSES, skip_bad_images=True)


def test_bad_check_mode(tmp_path, root):
  with pytest.raises(ValueError, match="check_images"):
    lists.read_list(_list(tmp_path, "d/angry/0.jpg 0\n"), root, CLASSES, check_images="yes")
