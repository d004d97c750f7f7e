"""The exported model (`eercl_jax.tools.export`, eercl_jax/artefact.py, eercl_jax/serving.py):
it loads without any config and predicts as the in-memory model does, takes images of any size
and kind, its TF SavedModel computes what the JAX model computes, and a broken one is refused
in one line naming the file. Tiny randomly initialised models, no training, except the command's
end-to-end test on the shared source run."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo_source
from eercl_jax import artefact, export, inference
from eercl_jax.data import pipelines, transforms
from eercl_jax.errors import CheckpointError, DataError
from eercl_jax.models import eercl, registry
from eercl_jax.tools import export as export_tool
from eercl_jax.tools import predict
from tests.conftest import REPO

# The SavedModel runs the same StableHLO as JAX, compiled by TensorFlow's XLA with other fusion
# and summation orders: measured max differences <= 1e-6 of the output's largest magnitude
# (float32). The bound: 1e-5 x max(1, max |output|) - 1e-5 absolute on O(1) outputs.
SERVING_TOL = 1e-5
# The exported model through `predict` (8-device sharded batches) against a one-device forward.
PREDICT_ATOL = 1e-6


def _tiny(backbone: str):
  """(config, model, variables) of a test-sized model with random, non-degenerate variables:
  perturbed params and BN statistics, so logits differ clearly between images and classes."""
  c = demo_source.get_config("runlocal")
  c.model.backbone = backbone
  c.model.size = registry.get(backbone).test_size
  model = eercl.create_model(c.model)
  variables = jax.device_get(eercl.init_variables(model, jax.random.PRNGKey(0), c.data.crop))
  rng = np.random.default_rng(1)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(x.shape).astype(x.dtype)
    if name.endswith(("['var']", "['scale']")):   # BN variances and scales stay positive
      return (np.abs(x) * (1 + 0.2 * noise) + 0.1).astype(x.dtype)
    return x + 0.05 * noise
  variables = jax.tree_util.tree_map_with_path(perturb, variables)
  # A sharper classifier: weight-norm scale g of 10, so the probabilities are far from uniform.
  variables["params"]["classifier"]["g"] = np.full_like(
      variables["params"]["classifier"]["g"], 10.0)
  return c, model, variables


def _view(c) -> dict:
  return {k: c.data[k] for k in ("resize", "crop", "mean", "std")}


def _reference_probabilities(c, model, variables, rgb_images):
  """The in-memory model on the test view of `rgb_images`, one device, no pipeline."""
  crops = np.stack([transforms.test_view(x, c.data.resize, c.data.crop) for x in rgb_images])
  norm = pipelines.Normalization.from_config(c.data)
  _, logits = model.apply(variables, norm(crops), train=False)
  return np.asarray(jax.nn.softmax(logits, -1))


def _images(seed=0):
  """RGB uint8 images of different sizes, with structure (a gradient and a blob)."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in ((40, 50), (64, 20), (36, 36), (17, 90)):
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
    out.append(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope="module")
def tiny_vit():
  return _tiny("vit")


@pytest.fixture(scope="module")
def exported_vit(tiny_vit, tmp_path_factory):
  c, _, variables = tiny_vit
  out = str(tmp_path_factory.mktemp("export") / "vit")
  export.write_model(out, c.model, variables, c.data.class_names, _view(c),
                     {"checkpoint": "runs/x/best", "step": 7, "stage": "source"})
  return out


@pytest.fixture(scope="module")
def loaded_vit(exported_vit):
  return inference.load(exported_vit)


# ----------------------------------------------------------------------------- round trip

def test_round_trip_loads_without_a_config(exported_vit, tiny_vit, tmp_path, monkeypatch):
  c, model, variables = tiny_vit
  monkeypatch.chdir(tmp_path)            # no configs/, no run folder: only the artefact
  assert not os.path.exists("configs")
  loaded = inference.load(exported_vit)
  assert loaded.exported and loaded.step == 7 and loaded.stage == "source"
  assert loaded.class_names == tuple(c.data.class_names)
  assert set(loaded.config) == {"model", "data"}   # all it knows comes from the manifest
  for k in artefact.MODEL_KEYS:
    assert loaded.config.model[k] == c.model[k], k
  # Every tensor back bit for bit, BN statistics included.
  want, got = artefact.leaves(variables), artefact.leaves(jax.device_get(loaded.variables))
  assert set(got) == set(want) and any(k.startswith("batch_stats/") for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)
  # The manifest's own path loads the same model.
  assert inference.load(os.path.join(exported_vit, "manifest.json")).directory == exported_vit

  imgs = _images()
  probs = loaded.probabilities([Image.fromarray(x) for x in imgs])
  want_probs = _reference_probabilities(c, model, variables, imgs)
  np.testing.assert_allclose(probs, want_probs, atol=PREDICT_ATOL)
  assert np.ptp(want_probs) > 0.1   # the check can see a wrong view or normalisation


def test_predict_takes_images_of_any_size_and_kind(loaded_vit, tiny_vit, tmp_path):
  c, model, variables = tiny_vit
  loaded = loaded_vit
  names = list(c.data.class_names)
  imgs = _images(1)
  grey = imgs[0][..., 0]
  rgba = np.concatenate([imgs[1], np.full(imgs[1].shape[:2] + (1,), 7, np.uint8)], -1)
  path = str(tmp_path / "face.png")
  Image.fromarray(imgs[2]).save(path)
  inputs = [Image.fromarray(imgs[0]), Image.fromarray(grey),           # PIL RGB, PIL 'L'
            grey, grey[..., None], rgba,                              # numpy grey, grey x1, RGBA
            path, Image.fromarray(imgs[3]).convert("P")]              # a file, a palette image
  out = loaded.predict(inputs)
  assert len(out) == len(inputs)
  grey_rgb = np.repeat(grey[..., None], 3, -1)
  expected = [imgs[0], grey_rgb, grey_rgb, grey_rgb, imgs[1], imgs[2],
              np.asarray(Image.fromarray(imgs[3]).convert("P").convert("RGB"))]
  want = _reference_probabilities(c, model, variables, expected)
  for p, w in zip(out, want):
    got = np.array([p["probabilities"][n] for n in names])
    np.testing.assert_allclose(got, w, atol=PREDICT_ATOL)
    assert p["class"] == names[p["index"]] == names[int(np.argmax(got))]
  # Files alone go through the list pipeline (grain workers): the same numbers.
  np.testing.assert_allclose(loaded.probabilities([path]), want[5:6], atol=PREDICT_ATOL)
  # One (N, H, W, 3) array is a batch.
  np.testing.assert_allclose(loaded.probabilities(np.stack([imgs[2], imgs[2]])),
                             want[[5, 5]], atol=PREDICT_ATOL)
  assert loaded.predict([]) == []

  with pytest.raises(DataError, match=r"images\[1\]: expected uint8 pixels .* float32"):
    loaded.predict([imgs[0], imgs[0].astype(np.float32)])
  with pytest.raises(DataError, match=r"images\[0\]: expected an \(H, W\).* shape \(4, 4, 2\)"):
    loaded.predict([np.zeros((4, 4, 2), np.uint8)])
  with pytest.raises(DataError, match="wrap a single image in a list"):
    loaded.predict(Image.fromarray(imgs[0]))
  with pytest.raises(DataError, match="gone.png"):
    loaded.predict([str(tmp_path / "gone.png"), imgs[0]])


# --------------------------------------------------------------------------- serving format

def _check_saved_model(folder, loaded):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  doc = artefact.read_manifest(folder)
  entry = doc["serving"]["tf_saved_model"]
  crop = doc["input"]["crop"]
  assert entry["input_shape"] == [None, crop, crop, 3] and entry["input_dtype"] == "uint8"
  sm = tf.saved_model.load(os.path.join(folder, entry["path"]))
  serve = sm.signatures[entry["signature"]]
  with open(os.path.join(folder, entry["path"], "assets", "manifest.json"),
            encoding="utf-8") as f:
    assert json.load(f) == doc
  rng = np.random.default_rng(3)
  worst = {}
  for n in (5, 2):   # the batch size is free
    crops = rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)
    got = {k: np.asarray(v) for k, v in serve(**{entry["input"]: tf.constant(crops)}).items()}
    assert sorted(got) == sorted(entry["outputs"])
    feats, probs = loaded.evaluator.embed(loaded.variables, crops)
    want = {"logits": np.asarray(loaded.evaluator.logits(loaded.variables, crops)),
            "probabilities": np.asarray(probs), "features": np.asarray(feats)}
    assert np.ptp(want["logits"]) > 0.5
    for k in want:
      scale = max(1.0, float(np.max(np.abs(want[k]))))
      np.testing.assert_allclose(got[k], want[k], atol=SERVING_TOL * scale, rtol=0, err_msg=k)
      diff = float(np.max(np.abs(got[k] - want[k])))
      worst[k] = max(worst.get(k, (0.0,)), (diff / scale, diff, scale))
  print("SavedModel vs JAX, (max |difference| / scale, max |difference|, scale = max(1, "
        "max |output|)):", worst)


def test_saved_model_equals_the_jax_model_vit(exported_vit, loaded_vit):
  _check_saved_model(exported_vit, loaded_vit)


@pytest.mark.slow   # ResNet's conversion and TF compile take ~20 s on two cores
def test_saved_model_equals_the_jax_model_resnet(tmp_path):
  c, _, variables = _tiny("resnet")
  out = str(tmp_path / "resnet")
  export.write_model(out, c.model, variables, c.data.class_names, _view(c))
  _check_saved_model(out, inference.load(out))


def test_jax_format_writes_no_saved_model(tiny_vit, tmp_path):
  c, _, variables = tiny_vit
  out = str(tmp_path / "m")
  export.write_model(out, c.model, variables, c.data.class_names, _view(c), fmt="jax")
  assert sorted(os.listdir(out)) == ["manifest.json", "variables.safetensors"]
  assert artefact.read_manifest(out)["serving"] == {}
  with pytest.raises(FileExistsError, match="already exists"):
    export.write_model(out, c.model, variables, c.data.class_names, _view(c), fmt="jax")
  assert export_tool.FORMATS == export.FORMATS


# ------------------------------------------------------------------------------ bad artefacts

def _copy(src, dst, drop=()):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("saved_model", *drop))
  return str(dst)


def _edit_manifest(folder, **changes):
  path = os.path.join(folder, "manifest.json")
  with open(path, encoding="utf-8") as f:
    doc = json.load(f)
  doc.update(changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(doc, f)
  return path


def test_bad_artefacts_are_one_line_errors_naming_the_file(exported_vit, tmp_path, capsys):
  image = str(tmp_path / "face.png")
  Image.fromarray(_images()[0]).save(image)

  def fails(folder, pattern):
    with pytest.raises(CheckpointError, match=pattern):
      inference.load(folder)
    assert predict.main([f"--checkpoint={folder}", image]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err

  no_manifest = _copy(exported_vit, tmp_path / "no_manifest", drop=("manifest.json",))
  err = fails(no_manifest, "manifest.json: missing")
  assert os.path.join(no_manifest, "manifest.json") in err

  future = _copy(exported_vit, tmp_path / "future")
  path = _edit_manifest(future, version=2)
  assert path in fails(future, r"format version 2; this eercl_jax reads version 1")

  alien = _copy(exported_vit, tmp_path / "alien")
  path = _edit_manifest(alien, format="something.else")
  assert path in fails(alien, "format 'something.else', expected 'eercl_jax.model'")

  garbled = _copy(exported_vit, tmp_path / "garbled")
  with open(os.path.join(garbled, "manifest.json"), "w", encoding="utf-8") as f:
    f.write("{not json")
  fails(garbled, "manifest.json: unreadable manifest")

  names = _copy(exported_vit, tmp_path / "names")
  _edit_manifest(names, class_names=["a", "b"])
  fails(names, "class_names must list model.num_classes=7 names")

  # Variables of another model: the error names the file and the tensors.
  other = _copy(exported_vit, tmp_path / "other")
  doc = artefact.read_manifest(other)
  _edit_manifest(other, model=dict(doc["model"], feat_dim=8))
  err = fails(other, r"variables.safetensors: does not fit the manifest's model \(misshapen .*"
              r"params/classifier/v \(7, 16\), the model's \(7, 8\)")
  assert os.path.join(other, "variables.safetensors") in err

  unknown = _copy(exported_vit, tmp_path / "unknown")
  path = _edit_manifest(unknown, model=dict(doc["model"], backbone="mlp"))
  assert path in fails(unknown, "manifest.json: config.model.backbone='mlp': unknown backbone")

  no_vars = _copy(exported_vit, tmp_path / "no_vars", drop=("variables.safetensors",))
  fails(no_vars, "variables.safetensors: missing")


# ------------------------------------------------------------------------- the command, e2e

def test_export_command_and_predict_with_it(source_run, data_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(data_dir)
  image = "data/fer/synth_studio/sad/synth_studio_test_0000.jpg"
  out = str(tmp_path / "exported")
  assert export_tool.main([source_run, out]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {out}"
  doc = artefact.read_manifest(out)
  assert doc["source"]["checkpoint"] == os.path.join(os.path.abspath(source_run), "best")
  assert doc["source"]["stage"] == "source" and doc["source"]["step"] == 4
  assert os.path.isdir(os.path.join(out, "saved_model"))
  assert export_tool.main([source_run, out]) == 2
  assert "already exists" in capsys.readouterr().err

  assert predict.main([f"--checkpoint={source_run}", "--format=json", image]) == 0
  from_run = json.loads(capsys.readouterr().out)
  # From a folder without any config (the exported model's own), through the CLI.
  env = dict(os.environ, PYTHONPATH=REPO)
  abs_image = os.path.abspath(image)
  proc = subprocess.run([sys.executable, "-m", "eercl_jax.predict", f"--checkpoint={out}",
                         "--format=json", abs_image], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  from_export = json.loads(proc.stdout)
  assert from_export["checkpoint"] == out and from_export["step"] == 4
  assert from_export["class_names"] == from_run["class_names"]
  a, b = from_run["predictions"][0], from_export["predictions"][0]
  assert a["class"] == b["class"]
  names = from_run["class_names"]
  np.testing.assert_allclose([b["probabilities"][n] for n in names],
                             [a["probabilities"][n] for n in names], atol=PREDICT_ATOL)

  # A consumer without JAX or this code: TensorFlow, Pillow and the manifest only.
  consumer = """
import json, sys
sys.modules["jax"] = sys.modules["flax"] = sys.modules["eercl_jax"] = None   # not available
import numpy as np, tensorflow as tf
from PIL import Image
folder, image = sys.argv[1:]
doc = json.load(open(folder + "/manifest.json"))
r, c = doc["input"]["resize"], doc["input"]["crop"]
im = np.asarray(Image.open(image).convert("RGB").resize((r, r), Image.Resampling.BILINEAR))
o = (r - c) // 2
crop = im[None, o:o + c, o:o + c]
entry = doc["serving"]["tf_saved_model"]
serve = tf.saved_model.load(folder + "/" + entry["path"]).signatures[entry["signature"]]
p = serve(**{entry["input"]: tf.constant(crop)})["probabilities"].numpy()[0]
print(json.dumps(dict(zip(doc["class_names"], p.tolist()))))
"""
  proc = subprocess.run([sys.executable, "-c", consumer, out, abs_image], cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  served = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose([served[n] for n in names],
                             [a["probabilities"][n] for n in names], atol=SERVING_TOL)

  # --config.mode=eval scores the exported model as it scores the run's checkpoint.
  def evaluate(checkpoint):
    c = demo_source.get_config()
    c.mode = "eval"
    c.eval.update(checkpoint=checkpoint,
                  lists="data/txt/fer/unlabeled_target_images_synth_wild_0.txt",
                  output=str(tmp_path / f"eval_{os.path.basename(checkpoint)}.json"))
    return inference.evaluate_checkpoint(c, str(tmp_path))
  run_doc, export_doc = evaluate(os.path.join(source_run, "best")), evaluate(out)
  assert export_doc["checkpoint"] == out and export_doc["stage"] == "source"
  assert export_doc["lists"] == run_doc["lists"]

  # --format=jax, from the exported model itself: the same manifest without the SavedModel.
  again = str(tmp_path / "again")
  assert export_tool.main([out, again, "--format=jax"]) == 0
  redo = artefact.read_manifest(again)
  assert redo["source"] == doc["source"] and redo["serving"] == {}
  assert redo["model"] == doc["model"] and redo["input"] == doc["input"]
