"""Synthetic FER set: files and lists in the real layout, parseable, balanced or imbalanced as
asked, idempotent."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import demo_adapt, demo_source
from eercl_jax import config_defaults
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


def test_imbalanced_counts_and_the_dry_run_uses_them(tmp_path):
  """`imbalanced=1`: class c gets per_class * CLASS_WEIGHTS[c] images, all counts different, so
  the accuracy of a model and its mean class accuracy differ (the dry run the tests train on)."""
  assert synthetic.class_counts(16, 1) == [14, 8, 10, 28, 22, 18, 12]
  assert synthetic.class_counts(16, 0) == [16] * 7
  assert sum(synthetic.CLASS_WEIGHTS) == pytest.approx(len(synthetic.CLASSES))
  assert len(set(synthetic.CLASS_WEIGHTS)) == 7 and 1.0 not in synthetic.CLASS_WEIGHTS
  assert synthetic.DEFAULTS["imbalanced"] == 0              # the demo (README numbers) is balanced
  for demo in (demo_source, demo_adapt):
    assert demo.get_config().data.synthetic.imbalanced == 0
    assert demo.get_config("runlocal").data.synthetic.imbalanced == 1   # the tests' dry run
  small = {**SMALL, "imbalanced": 1}
  paths = synthetic.generate(str(tmp_path / "imb"), **small)
  for split, per_class in (("source_train", 3), ("source_test", 2), ("target", 2)):
    fl = lists.read_list(paths[split], paths["image_root"], synthetic.CLASSES)
    counts = lists.count_per_class(fl)
    np.testing.assert_array_equal(counts, synthetic.class_counts(per_class, 1))
    assert len(set(counts.tolist())) > 1, split
    # Interleaved: the first seven lines hold one image of every class.
    assert sorted(fl.labels[:7].tolist()) == list(range(7))
  # Image i of a class is the same picture as in the balanced set.
  balanced = synthetic.generate(str(tmp_path / "bal"), **SMALL)
  rel = os.path.join("synth_wild", "happy", "synth_wild_target_0001.jpg")
  np.testing.assert_array_equal(images.load_image(os.path.join(paths["image_root"], rel)),
                                images.load_image(os.path.join(balanced["image_root"], rel)))
  # The dry run (tests/conftest.py's data_dir, the runlocal configs): imbalanced, with the
  # totals of the balanced counts (168/56/112 images: batch and bank arithmetic unchanged).
  dry = config_defaults.RUNLOCAL_SYNTHETIC
  assert dry["imbalanced"] == 1
  for key, total in (("train_per_class", 168), ("test_per_class", 56),
                     ("target_per_class", 112)):
    counts = synthetic.class_counts(dry[key], 1)
    assert sum(counts) == total and len(set(counts)) == 7, key


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
  stamp = os.path.getmtime(paths["target"])
  synthetic.ensure_generated(root, **{**SMALL, "target_per_class": 1, "imbalanced": 1})
  assert os.path.getmtime(paths["target"]) > stamp                  # the counts differ too
  fl = lists.read_list(paths["target"], paths["image_root"], synthetic.CLASSES)
  np.testing.assert_array_equal(lists.count_per_class(fl), synthetic.class_counts(1, 1))
  # A manifest from before `imbalanced` existed stands for a balanced set: not regenerated.
  synthetic.ensure_generated(root, **{**SMALL, "target_per_class": 1})
  with open(manifest) as f:
    manifest_doc = json.load(f)
  del manifest_doc["imbalanced"]
  with open(manifest, "w") as f:
    json.dump(manifest_doc, f)
  stamp = os.path.getmtime(paths["target"])
  synthetic.ensure_generated(root, **{**SMALL, "target_per_class": 1})
  assert os.path.getmtime(paths["target"]) == stamp
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
