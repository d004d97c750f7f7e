import numpy as np
import jax.numpy as jnp

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
