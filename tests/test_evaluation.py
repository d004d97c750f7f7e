import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from eercl_jax import evaluation


def test_confusion_and_summary_against_counts():
  labels = np.array([0, 0, 1, 2, 2, 2, 1])
  preds = np.array([0, 1, 1, 2, 0, 2, 1])
  valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)   # the padded last row is ignored
  cm = np.asarray(evaluation.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels),
                                              jnp.asarray(valid), 4))
  want = np.zeros((4, 4), int)
  for l, p, v in zip(labels, preds, valid):
    want[l, p] += v
  np.testing.assert_array_equal(cm, want)
  s = evaluation.summarize(cm)
  assert s["count"] == 6
  assert s["accuracy"] == 4 / 6
  np.testing.assert_allclose(s["per_class_accuracy"][:3], [0.5, 1.0, 2 / 3])
  assert np.isnan(s["per_class_accuracy"][3])            # class 3 never occurs
  assert s["mean_class_accuracy"] == np.mean([0.5, 1.0, 2 / 3])


def _confusion_with_gaps():
  """5 classes: class 3 is never predicted (precision 0/0), class 4 has no image (no
  support) but is predicted once."""
  return np.array([[5, 1, 0, 0, 1],
                   [2, 3, 1, 0, 0],
                   [0, 0, 4, 0, 0],
                   [1, 1, 1, 0, 0],
                   [0, 0, 0, 0, 0]])


def test_precision_recall_f1_against_scikit_learn():
  from sklearn import metrics  # pylint: disable=import-outside-toplevel
  cm = _confusion_with_gaps()
  true = np.repeat(np.arange(5), cm.sum(1))
  pred = np.concatenate([np.repeat(np.arange(5), row) for row in cm])
  s = evaluation.summarize(cm)
  supported = [0, 1, 2, 3]
  p, r, f, n = metrics.precision_recall_fscore_support(true, pred, labels=supported,
                                                       zero_division=0)
  np.testing.assert_allclose(s["precision"][:4], p)
  np.testing.assert_allclose(s["recall"][:4], r)
  np.testing.assert_allclose(s["f1"][:4], f)
  np.testing.assert_array_equal(s["support"], [7, 6, 4, 3, 0])
  np.testing.assert_array_equal(s["predicted"], [8, 5, 6, 0, 1])
  # Never predicted: precision 0 (not undefined), so it lowers the macro averages.
  assert s["precision"][3] == 0.0 and s["f1"][3] == 0.0
  # No support: recall and F1 undefined, precision 0 (its one prediction is wrong); left out of
  # the macro averages, which are over the classes with images.
  assert np.isnan(s["recall"][4]) and np.isnan(s["f1"][4]) and s["precision"][4] == 0.0
  for key, avg in (("macro_precision", p), ("macro_recall", r), ("macro_f1", f)):
    assert s[key] == pytest.approx(np.mean(avg))
  assert s["macro_f1"] == pytest.approx(metrics.f1_score(true, pred, labels=supported,
                                                         average="macro", zero_division=0))
  assert s["mean_class_accuracy"] == s["macro_recall"]
  np.testing.assert_array_equal(s["per_class_accuracy"][:4], s["recall"][:4])
  # A class neither in the list nor predicted: every score undefined.
  empty = evaluation.summarize(np.diag([3, 0]))
  assert np.isnan(empty["precision"][1]) and np.isnan(empty["f1"][1])
  assert empty["macro_f1"] == 1.0


def test_class_table_document_and_scalars():
  names = ["angry", "disgust", "fear", "happy", "surprise"]
  s = evaluation.summarize(_confusion_with_gaps())
  table = evaluation.format_class_table(s, names).splitlines()
  assert table[0].split() == ["class", "support", "predicted", "precision", "recall", "f1"]
  happy = next(l for l in table if l.startswith("happy")).split()
  assert happy == ["happy", "3", "0", "0.0", "0.0", "0.0"]
  surprise = next(l for l in table if l.startswith("surprise")).split()
  assert surprise == ["surprise", "0", "1", "0.0", "-", "-"]
  macro = table[-1].split()
  assert macro[:3] == ["macro", "avg", "20"]
  assert float(macro[-1]) == pytest.approx(s["macro_f1"] * 100, abs=0.05)
  doc = evaluation.per_class_document(s, names)
  assert doc["surprise"] == {"support": 0, "predicted": 1, "precision": 0.0, "recall": None,
                             "f1": None}
  assert doc["angry"]["recall"] == pytest.approx(5 / 7)
  assert "macro_f1=" in evaluation.format_metrics("target", s, names)
  assert evaluation.scalars({"target": s})["eval/target_macro_f1"] == s["macro_f1"]


def test_confusion_json_carries_the_class_names(tmp_path):
  cm = _confusion_with_gaps()
  path = evaluation.save_confusions(str(tmp_path), 30, {"target": evaluation.summarize(cm)},
                                    ["a", "b", "c", "d", "e"])
  assert path.endswith(os.path.join("logs", "confusion_000030.json"))
  with open(path) as f:
    doc = json.load(f)
  assert doc == {"step": 30, "class_names": ["a", "b", "c", "d", "e"],
                 "confusion_convention": "rows = true class, columns = predicted class",
                 "confusions": {"target": cm.tolist()}}
