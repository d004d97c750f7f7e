"""Run records (config.json, results.json, the config in the log and in TensorBoard's hparams),
evaluation of a checkpoint (`--config.mode=eval`) and prediction (`eercl_jax.predict`), on the
shared tiny source run (the tables of `eercl_jax.summarize`: tests/test_tables.py)."""
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from configs import demo_source
from eercl_jax import inference, records
from eercl_jax.tools import predict
from eercl_jax.data import lists
from eercl_jax.errors import DataError
from tests.conftest import REPO

RESULTS_KEYS = {"stage", "method", "seed", "config_file", "workdir", "selection", "best_step",
                "last_step", "lists", "selections", "evaluations", "wall_time_s", "devices",
                "versions"}


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ------------------------------------------------------------------------------- run records

def test_results_and_config_json(source_run):
  config = _json(os.path.join(source_run, "config.json"))
  assert config["stage"] == "source" and config["num_steps"] == 4
  assert config["model"]["feat_dim"] == 16 and config["mode"] == "train"

  res = _json(os.path.join(source_run, "results.json"))
  assert set(res) == RESULTS_KEYS
  assert res["stage"] == "source" and res["seed"] == config["seed"]
  assert res["config_file"] is None          # started from Python, not the CLI
  assert res["workdir"] == os.path.abspath(source_run)
  assert res["selection"] == "best source accuracy"
  assert res["best_step"] == res["last_step"] == 4
  assert list(res["lists"]) == ["target", "source"]     # the target first
  assert res["lists"]["target"]["role"] == "target"
  assert res["lists"]["source"]["role"] == "source_test"
  assert res["devices"] == {"count": jax.device_count(), "kind": jax.devices()[0].device_kind}
  assert res["versions"]["jax"] == jax.__version__ and res["wall_time_s"] > 0
  # The last evaluation's accuracies are those of its confusion matrices, as fractions (the dry
  # run's lists have unequal class counts, so a mean class accuracy recorded as the accuracy fails).
  confusions = _json(os.path.join(source_run, "logs", "confusion_000004.json"))
  assert confusions["class_names"] == list(demo_source.get_config().data.class_names)
  assert confusions["step"] == 4 and confusions["confusion_convention"].startswith("rows = true")
  for name, entry in res["lists"].items():
    assert entry["source_only"] is None
    cm = np.asarray(confusions["confusions"][name])
    per_class = np.diag(cm) / cm.sum(1)
    assert entry["last"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert entry["last"]["mean_class_accuracy"] == pytest.approx(per_class.mean())
    assert entry["best"] == entry["last"]   # the one evaluation is also the best

  log = open(os.path.join(source_run, "logs", "train.log"), encoding="utf-8").read()
  assert "config (recorded in" in log and "num_steps: 4" in log
  assert "results written to" in log
  # metrics.csv: the one evaluation (step 4), its accuracies those of results.json.
  with open(os.path.join(source_run, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["step"] for r in rows] == ["4"]
  assert list(rows[0]) == ["step", "source_accuracy", "source_mean_class_accuracy",
                           "source_macro_f1", "target_accuracy", "target_mean_class_accuracy",
                           "target_macro_f1", "wall_time_s"]
  for name, entry in res["lists"].items():
    assert float(rows[0][f"{name}_accuracy"]) == pytest.approx(entry["last"]["accuracy"])
    assert 0.0 <= float(rows[0][f"{name}_macro_f1"]) <= 1.0
  assert 0 < float(rows[0]["wall_time_s"]) <= res["wall_time_s"]


def test_rerun_of_a_finished_run_keeps_its_best_results(source_run, data_dir, monkeypatch,
                                                        tmp_path):
  """Rerunning a finished run resumes after its last step: results.json is written again, with
  the best step's accuracies read back from the checkpoint."""
  from eercl_jax import train_source  # pylint: disable=import-outside-toplevel

  monkeypatch.chdir(data_dir)
  copy = tmp_path / "copy"
  shutil.copytree(source_run, copy, ignore=shutil.ignore_patterns("eval", "run.lock"))
  before = _json(copy / "results.json")
  c = demo_source.get_config("runlocal")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 4
  t0 = time.time()
  train_source.train_and_evaluate(c, str(copy))
  rerun_s = time.time() - t0
  after = _json(copy / "results.json")
  assert after["lists"] == before["lists"] and after["best_step"] == before["best_step"] == 4
  # Summed over both starts: the first start's time up to its last checkpoint is carried over
  # (what it spent after that checkpoint, on the final evaluation, is not in the checkpoint).
  assert after["wall_time_s"] > rerun_s + 0.5


def test_config_in_tensorboard_hparams(source_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=import-outside-toplevel
  events = glob.glob(os.path.join(source_run, "tensorboard", "events.out.tfevents.*"))
  acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
  acc.Reload()
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hp["num_steps"].number_value == 4
  assert hp["model.feat_dim"].number_value == 16
  assert hp["stage"].string_value == "source"
  assert json.loads(hp["data.class_names"].string_value) == list(demo_source.get_config()
                                                                 .data.class_names)


def test_hparams_are_flat_scalars():
  hp = records.hparams(demo_source.get_config())
  assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
  assert hp["optim.lr_mult.backbone"] == 1.0 and hp["model.size"] == "mu/8"
  assert hp["data.eval_lists.target"].endswith("unlabeled_target_images_synth_wild_0.txt")


# ------------------------------------------------------------------------------ --mode=eval

@pytest.fixture(scope="module")
def evaluated(source_run, data_dir):
  """`--config.mode=eval` of the tiny run's best checkpoint through the CLI."""
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.main", f"--config={REPO}/configs/demo_source.py",
       f"--workdir={source_run}", "--config.mode=eval"],
      cwd=data_dir, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, _json(os.path.join(source_run, "eval", "best_step4.json")), proc.stderr


def test_eval_mode_cli(evaluated, source_run):
  stdout, doc, stderr = evaluated
  names = list(demo_source.get_config().data.class_names)
  assert doc["class_names"] == names and doc["step"] == 4 and doc["stage"] == "source"
  assert doc["confusion_convention"] == "rows = true class, columns = predicted class"
  assert doc["checkpoint"] == os.path.join(os.path.abspath(source_run), "best")
  assert list(doc["lists"]) == ["target", "source"]
  res = _json(os.path.join(source_run, "results.json"))
  for name, entry in doc["lists"].items():
    cm = np.asarray(entry["confusion"])
    assert cm.shape == (7, 7) and cm.sum() == entry["count"]
    # Rows are the true classes: each row sums to that class's images in the list.
    fl = lists.read_list(entry["list"], os.path.join(os.path.dirname(entry["list"]),
                                                     "..", "..", "fer"), names,
                         check_images="none")
    np.testing.assert_array_equal(cm.sum(1), lists.count_per_class(fl))
    per = [entry["per_class_accuracy"][c] for c in names]
    np.testing.assert_allclose(per, np.diag(cm) / cm.sum(1))
    # The same checkpoint, the same evaluation as the run's own at its best step.
    assert entry["accuracy"] == pytest.approx(res["lists"][name]["best"]["accuracy"])
    assert entry["mean_class_accuracy"] == pytest.approx(res["lists"][name]["best"]["mean_class_accuracy"])
  assert "true \\ predicted" in stdout and "written to" in stdout
  assert stdout.index("target: acc=") < stdout.index("source: acc=")
  assert "target: synth_wild (" in stdout and "source: synth_studio (" in stdout


def test_eval_mode_per_class_scores_and_per_image_predictions(evaluated, source_run):
  """Precision, recall and F1 per class with macro averages (the JSON and a table on the
  terminal), and a CSV row per image whose predictions make the JSON's confusion matrices."""
  stdout, doc, stderr = evaluated
  names = doc["class_names"]
  for name, entry in doc["lists"].items():
    assert entry["dataset"] == {"target": "synth_wild", "source": "synth_studio"}[name]
    cm = np.asarray(entry["confusion"])
    per = entry["per_class"]
    assert [per[c]["support"] for c in names] == cm.sum(1).tolist()
    assert [per[c]["predicted"] for c in names] == cm.sum(0).tolist()
    for i, c in enumerate(names):
      want = cm[i, i] / cm[:, i].sum() if cm[:, i].sum() else 0.0   # never predicted: 0
      assert per[c]["precision"] == pytest.approx(want)
      assert per[c]["recall"] == pytest.approx(entry["per_class_accuracy"][c])
    f1 = [per[c]["f1"] for c in names]
    assert entry["macro_f1"] == pytest.approx(np.mean(f1))   # every class has images here
    assert entry["macro_recall"] == pytest.approx(entry["mean_class_accuracy"])
  assert stdout.count("macro avg") == 2 and "precision" in stdout

  path = os.path.join(source_run, "eval", "best_step4_predictions.csv")
  assert doc["predictions"] == os.path.abspath(path)
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["list", "path", "true", "predicted", "correct",
                           *[f"p_{c}" for c in names]]
  for name, entry in doc["lists"].items():
    mine = [r for r in rows if r["list"] == name]
    assert len(mine) == entry["count"]
    got = np.zeros((len(names), len(names)), int)
    for r in mine:
      probs = np.array([float(r[f"p_{c}"]) for c in names])
      assert probs.sum() == pytest.approx(1.0, abs=1e-4)
      assert r["predicted"] == names[int(np.argmax(probs))]
      assert r["correct"] == str(int(r["true"] == r["predicted"]))
      got[names.index(r["true"]), names.index(r["predicted"])] += 1
    np.testing.assert_array_equal(got, entry["confusion"])
  # Paths relative to the image root, in list order.
  with open(doc["lists"]["target"]["list"]) as f:
    listed = [line.split()[0] for line in f if line.strip()]
  assert [r["path"] for r in rows if r["list"] == "target"] == listed

  # The terminal holds the report, no checkpoint-library or config lines; those are in the log.
  assert "checkpoint_manager" not in stderr and "orbax" not in stderr
  assert len((stdout + stderr).splitlines()) < 60
  log = open(os.path.join(source_run, "eval", "eval.log"), encoding="utf-8").read()
  assert "checkpoint_manager.py" in log and "loaded " in log


def _eval_config(**eval_keys):
  c = demo_source.get_config()
  c.mode = "eval"
  c.eval.update(eval_keys)
  return c


def test_eval_mode_step_folder_named_lists_and_errors(source_run, data_dir, monkeypatch,
                                                      tmp_path):
  monkeypatch.chdir(data_dir)
  target = "data/txt/fer/unlabeled_target_images_synth_wild_0.txt"
  out = tmp_path / "e.json"
  doc = inference.evaluate_checkpoint(_eval_config(
      checkpoint=os.path.join(source_run, "checkpoints", "4"),
      lists=f"wild={target},data/txt/fer/labeled_source_images_synth_studio.txt",
      output=str(out)), str(tmp_path))
  assert doc["checkpoint"] == os.path.join(os.path.abspath(source_run), "checkpoints")
  assert list(doc["lists"]) == ["wild", "labeled_source_images_synth_studio"]
  assert _json(out) == doc
  assert doc["lists"]["labeled_source_images_synth_studio"]["count"] == 168   # the dry run's

  with pytest.raises(FileNotFoundError, match="nowhere"):
    inference.evaluate_checkpoint(_eval_config(checkpoint="nowhere"), str(tmp_path))
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no orbax checkpoint found in .*empty_run"):
    inference.evaluate_checkpoint(_eval_config(), str(empty))
  with pytest.raises(DataError, match="missing.txt: list file not found"):
    inference.evaluate_checkpoint(_eval_config(lists="missing.txt"), source_run)
  bad = tmp_path / "bad.txt"
  bad.write_text("synth_wild/happy/synth_wild_target_0000.jpg 3\nno_label_here\n")
  with pytest.raises(DataError, match=r"bad.txt:2: expected"):
    inference.evaluate_checkpoint(_eval_config(lists=str(bad)), source_run)
  with pytest.raises(ValueError, match="config.eval.lists"):
    inference.parse_lists("a=x.txt,a=y.txt")


# ----------------------------------------------------------------------------------- predict

def test_predict_table_json_csv(evaluated, source_run, data_dir, monkeypatch, capsys):
  monkeypatch.chdir(data_dir)
  folder = "data/fer/synth_wild/happy"
  single = "data/fer/synth_studio/sad/synth_studio_test_0000.jpg"
  assert predict.main([f"--checkpoint={source_run}", "--format=json", folder, single]) == 0
  doc = json.loads(capsys.readouterr().out)
  names = doc["class_names"]
  files = sorted(os.listdir(folder))
  assert [p["path"] for p in doc["predictions"]] == [os.path.join(folder, f) for f in files] + [single]
  for p in doc["predictions"]:
    probs = np.array([p["probabilities"][c] for c in names])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert p["class"] == names[int(np.argmax(probs))] == names[p["index"]]
  # The same test view and model as evaluation: the folder's predictions are the 'happy' row of
  # the target list's confusion matrix.
  counts = np.bincount([p["index"] for p in doc["predictions"][:len(files)]], minlength=len(names))
  np.testing.assert_array_equal(counts,
                                evaluated[1]["lists"]["target"]["confusion"][names.index("happy")])

  assert predict.main([f"--checkpoint={source_run}", "--format=csv", "--batch_size=8",
                       single]) == 0
  rows = capsys.readouterr().out.strip().splitlines()
  assert rows[0] == "path,class," + ",".join(names)
  cells = rows[1].split(",")
  last = doc["predictions"][-1]
  assert cells[:2] == [single, last["class"]]
  np.testing.assert_allclose([float(x) for x in cells[2:]],
                             [last["probabilities"][c] for c in names], atol=1e-5)

  assert predict.main([f"--checkpoint={source_run}", single]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[1].split()[:3] == ["path", "class", "p"] and table[2].split()[:2] == [
      single, last["class"]]


def test_predict_errors(source_run, data_dir, monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(data_dir)
  image = "data/fer/synth_studio/sad/synth_studio_test_0000.jpg"
  assert predict.main(["--checkpoint=nowhere", image]) == 2
  assert "--checkpoint='nowhere' does not exist" in capsys.readouterr().err
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  assert predict.main([f"--checkpoint={source_run}", str(text)]) == 2
  assert f"{text}: not an image file" in capsys.readouterr().err
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not a jpeg at all")
  assert predict.main([f"--checkpoint={source_run}", image, str(broken)]) == 2
  err = capsys.readouterr().err
  assert "1 unreadable image(s)" in err and str(broken) in err
  assert predict.main([f"--checkpoint={source_run}", str(tmp_path / "gone.png")]) == 2
  assert "gone.png: no such file or folder" in capsys.readouterr().err
  (tmp_path / "no_images").mkdir()
  assert predict.main([f"--checkpoint={source_run}", str(tmp_path / "no_images")]) == 2
  assert "folder holds no image files" in capsys.readouterr().err


def test_mode_keys_are_validated():
  from eercl_jax import config_defaults  # pylint: disable=import-outside-toplevel
  c = demo_source.get_config()
  c.mode = "evaluate"
  with pytest.raises(ValueError, match="config.mode: 'evaluate'"):
    config_defaults.validate(c, num_devices=1)
  c.mode, c.eval.checkpoint = "eval", ""
  with pytest.raises(ValueError, match="config.eval.checkpoint: is empty"):
    config_defaults.validate(c, num_devices=1)


def test_eval_mode_refuses_a_list_of_another_class_order(tmp_path, monkeypatch):
  """The 19%-instead-of-100% case: a list built for another class order is refused by name
  before any image is read (the checkpoint is stood in for: only its config is used first)."""
  config = _eval_config(lists=f"other={tmp_path / 'other.txt'}")
  stored = demo_source.get_config()
  stored.data.class_names = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
  lists.write_list(str(tmp_path / "other.txt"), [("x/0.jpg", 0)], sorted(stored.data.class_names))
  monkeypatch.setattr(inference, "load", lambda *a, **k: types.SimpleNamespace(config=stored))
  with pytest.raises(DataError, match=re.escape(
      f"{tmp_path / 'other.txt'}: labels index (angry, disgust, fear, happy, neutral, sad, "
      "surprise)") + r".* but the checkpoint's config\.data\.class_names is \(surprise, fear, "
                     r"disgust, happy, sad, angry, neutral\): the same names in another order"):
    inference.evaluate_checkpoint(config, str(tmp_path))
