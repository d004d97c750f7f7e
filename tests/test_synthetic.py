"""Synthetic FER set: files and lists in the real layout, parseable, balanced, idempotent."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from eercl_jax.data import images, lists
from eercl_jax.data.datasets import synthetic

SMALL = dict(image_size=32, train_per_class=3, test_per_class=2, target_per_class=2, seed=1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth") / "data")
  return root, synthetic.generate(root, **SMALL)


def test_layout(generated):
  root, paths = generated
  assert paths["image_root"] == os.path.join(root, "fer")
  txt = os.path.join(root, "txt", "fer")
  assert paths["source_train"] == os.path.join(txt, "labeled_source_images_synth_studio.txt")
  assert paths["source_test"] == os.path.join(txt, "unlabeled_target_images_synth_studio_0.txt")
  assert paths["target"] == os.path.join(txt, "unlabeled_target_images_synth_wild_0.txt")
  line = open(paths["source_train"]).readline()
  assert line == "synth_studio/angry/synth_studio_train_0000.jpg 0\n"
  assert os.path.isfile(os.path.join(root, "fer", "synth_wild", "surprise",
                                     "synth_wild_target_0001.jpg"))


@pytest.mark.parametrize("split, per_class, domain", [
    ("source_train", 3, "synth_studio"), ("source_test", 2, "synth_studio"),
    ("target", 2, "synth_wild")])
def test_lists_parse_decode_and_are_balanced(generated, split, per_class, domain):
  _, paths = generated
  fl = lists.read_list(paths[split], paths["image_root"], synthetic.CLASSES)  # decodes every file
  np.testing.assert_array_equal(lists.count_per_class(fl), [per_class] * 7)
  for path, label in zip(fl.paths, fl.labels):
    parts = path.split(os.sep)
    assert parts[-3] == domain and parts[-2] == synthetic.CLASSES[label]
    img = images.load_image(path)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_every_list_has_its_class_order_file(generated, tmp_path):
  _, paths = generated
  for key in ("source_train", "source_test", "target"):
    assert lists.read_classes(paths[key])["class_names"] == synthetic.CLASSES
  # A set generated before lists carried their class order gets the files, not a regeneration.
  root = str(tmp_path / "old")
  old = synthetic.ensure_generated(root, **SMALL)
  for key in ("source_train", "target"):
    os.remove(lists.classes_path(old[key]))
  stamp = os.path.getmtime(old["source_train"])
  assert synthetic.ensure_generated(root, **SMALL) == old
  assert os.path.getmtime(old["source_train"]) == stamp
  for key in ("source_train", "source_test", "target"):
    assert lists.read_classes(old[key])["class_names"] == synthetic.CLASSES


def test_domains_differ_as_intended(generated):
  _, paths = generated
  studio = np.asarray(Image.open(os.path.join(paths["image_root"], "synth_studio", "happy",
                                              "synth_studio_train_0000.jpg")))
  wild = Image.open(os.path.join(paths["image_root"], "synth_wild", "happy",
                                 "synth_wild_target_0000.jpg"))
  assert studio.ndim == 3 and np.abs(studio[..., 0].astype(int) - studio[..., 2]).max() > 20
  wild = np.asarray(wild.convert("RGB")).astype(int)
  # Faded: far less colour than studio, but not none.
  assert (np.abs(wild[..., 0] - wild[..., 2]).mean()
          < 0.6 * np.abs(studio[..., 0].astype(int) - studio[..., 2]).mean())


def test_generation_is_deterministic(generated, tmp_path):
  root, paths = generated
  again = synthetic.generate(str(tmp_path / "again"), **SMALL)
  for split in ("source_train", "target"):
    a = lists.read_list(paths[split], paths["image_root"], synthetic.CLASSES, check_images="none")
    b = lists.read_list(again[split], again["image_root"], synthetic.CLASSES, check_images="none")
    for pa, pb in zip(a.paths[:5], b.paths[:5]):
      np.testing.assert_array_equal(images.load_image(pa), images.load_image(pb))


def test_generate_refuses_to_overwrite(generated):
  root, _ = generated
  with pytest.raises(FileExistsError):
    synthetic.generate(root, **SMALL)


def test_ensure_generated_is_idempotent(tmp_path):
  root = str(tmp_path / "data")
  paths = synthetic.ensure_generated(root, **SMALL)
  manifest = os.path.join(root, "txt", "fer", "synthetic_manifest.json")
  assert json.load(open(manifest))["image_size"] == 32
  stamp = os.path.getmtime(paths["source_train"])
  assert synthetic.ensure_generated(root, **SMALL) == paths
  assert os.path.getmtime(paths["source_train"]) == stamp          # not regenerated
  synthetic.ensure_generated(root, **{**SMALL, "target_per_class": 1})  # parameters differ
  fl = lists.read_list(paths["target"], paths["image_root"], synthetic.CLASSES)
  assert len(fl) == 7
  # Images of the old, larger generation are gone, not left behind.
  assert not os.path.exists(os.path.join(root, "fer", "synth_wild", "angry",
                                         "synth_wild_target_0001.jpg"))
  with pytest.raises(TypeError, match="unknown"):
    synthetic.ensure_generated(root, image_sise=32)


def test_cli(tmp_path):
  root = str(tmp_path / "cli")
  from eercl_jax.tools import synthetic as command  # pylint: disable=import-outside-toplevel
  assert command.main(["--root", root, "--image_size", "24", "--train_per_class", "1",
                       "--test_per_class", "1", "--target_per_class", "1"]) == 0
  fl = lists.read_list(os.path.join(root, "txt", "fer", "labeled_source_images_synth_studio.txt"),
                       os.path.join(root, "fer"), synthetic.CLASSES)
  assert len(fl) == 7 and images.load_image(fl.paths[0]).shape == (24, 24, 3)
