"""The evaluator: a model's one eval-mode forward, jitted once, and everything computed with it -
accuracies and confusion matrices on lists (training, eval mode), class probabilities (predict),
and L2-normalised features with probabilities (the adaptation's bank refresh, the feature map).

Built once per run from the config (`Evaluator.from_config`); every caller shares it, so an
evaluation during training, `--config.mode=eval` and `predict` score images the same way: the
test view, the config's normalisation, batches sharded over the mesh, each image exactly once.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from eercl_jax import logs, losses, parallel, selection
from eercl_jax.data import lists, pipelines


def confusion_matrix(preds, labels, valid, num_classes: int):
  """(C, C) counts, rows = true class, columns = predicted; rows with valid=False are ignored."""
  idx = labels * num_classes + preds
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[idx].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


_confusion = jax.jit(lambda logits, labels, valid, num_classes: confusion_matrix(
    jnp.argmax(logits, -1), labels, valid, num_classes), static_argnums=3)


def summarize(confusion: np.ndarray) -> dict:
  """Scores of a confusion matrix (rows = true class, columns = predicted):

  accuracy, mean_class_accuracy  (classes without images left out),
  per_class_accuracy             per class, NaN for a class without images (= its recall),
  support, predicted             (C,) images of each true class, predictions of each class,
  precision, recall, f1          (C,) per class (see below),
  macro_precision, macro_recall, macro_f1   their means over the classes with support,
  confusion, count.

  Precision of a class that is never predicted is 0/0: it is reported as 0 (scikit-learn's
  `zero_division=0`), so a model that never predicts a class pays for it in the macro averages
  (its recall is 0 too, so its F1 is 0). A class without support (no image of it in the list)
  has NaN recall and F1 (and NaN precision when it is never predicted either) and is left out
  of the macro averages; macro recall is then the mean class accuracy."""
  confusion = np.asarray(confusion, np.int64)
  total = confusion.sum()
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  hits = np.diag(confusion)
  nan = lambda: np.full(len(confusion), np.nan)
  recall = np.divide(hits, support, out=nan(), where=support > 0)
  precision = np.divide(hits, predicted, out=nan(), where=predicted > 0)
  precision[(predicted == 0) & (support > 0)] = 0.0
  pr = precision + recall
  f1 = np.divide(2 * precision * recall, pr, out=np.zeros(len(confusion)), where=pr > 0)
  f1[support == 0] = np.nan
  has = support > 0
  macro = lambda v: float(np.mean(v[has])) if np.any(has) else float("nan")
  return {
      "accuracy": float(np.trace(confusion) / max(total, 1)),
      "mean_class_accuracy": macro(recall),
      "per_class_accuracy": recall,
      "support": support,
      "predicted": predicted,
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "macro_precision": macro(precision),
      "macro_recall": macro(recall),
      "macro_f1": macro(f1),
      "confusion": confusion,
      "count": int(total),
  }


def format_metrics(name: str, summary: dict, class_names) -> str:
  per = " ".join(f"{c}={a * 100:.1f}" for c, a in zip(class_names, summary["per_class_accuracy"]))
  free = "".join(f" {k}={summary[k]:.4f}" for k in selection.LABEL_FREE if k in summary)
  f1 = f" macro_f1={summary['macro_f1'] * 100:.2f}" if "macro_f1" in summary else ""
  return (f"{name}: acc={summary['accuracy'] * 100:.2f} mean_class_acc="
          f"{summary['mean_class_accuracy'] * 100:.2f}{f1}{free} (n={summary['count']}) [{per}]")


def format_class_table(summary: dict, class_names) -> str:
  """Per-class support, predictions, precision, recall and F1 (percent) and their macro
  averages, as a text table. '-' marks an undefined value (a class without images)."""
  names = [str(c) for c in class_names]
  width = max([len(n) for n in names] + [len("macro avg")])
  pct = lambda v: "-".rjust(9) if np.isnan(v) else f"{v * 100:9.1f}"
  head = (f"{'class'.ljust(width)} {'support':>8} {'predicted':>9} {'precision':>9} "
          f"{'recall':>9} {'f1':>9}")
  rows = [f"{n.ljust(width)} {int(s):8d} {int(p):9d} {pct(pr)} {pct(r)} {pct(f)}"
          for n, s, p, pr, r, f in zip(names, summary["support"], summary["predicted"],
                                       summary["precision"], summary["recall"], summary["f1"])]
  macro = (f"{'macro avg'.ljust(width)} {int(np.sum(summary['support'])):8d} {'':9} "
           f"{pct(summary['macro_precision'])} {pct(summary['macro_recall'])} "
           f"{pct(summary['macro_f1'])}")
  return "\n".join([head, "-" * len(head), *rows, "-" * len(head), macro])


def per_class_document(summary: dict, class_names) -> dict:
  """{class: {'support', 'predicted', 'precision', 'recall', 'f1'}} with None for undefined
  values (JSON has no NaN)."""
  num = lambda v: None if np.isnan(v) else float(v)
  return {str(c): {"support": int(s), "predicted": int(p), "precision": num(pr),
                   "recall": num(r), "f1": num(f)}
          for c, s, p, pr, r, f in zip(class_names, summary["support"], summary["predicted"],
                                       summary["precision"], summary["recall"], summary["f1"])}


def gather_rows(x: jax.Array) -> np.ndarray:
  """A batch-sharded array as a whole numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """A model's eval-mode forward (BN running statistics, no dropout) on uint8 images.

  model:       the Flax model (`models.eercl.EERCLModel`).
  norm:        the run's normalisation (applied on the device).
  mesh:        batches are sharded over its data axis.
  loader:      how the lists are read (test view sizes, workers, this process's rows).
  batch_size:  the global evaluation batch.
  class_names: the classes the logits index.
  """

  def __init__(self, model, norm: pipelines.Normalization, mesh, loader: pipelines.Loader,
               batch_size: int, class_names):
    self.model, self.norm, self.mesh, self.loader = model, norm, mesh, loader
    self.batch_size, self.class_names = int(batch_size), tuple(class_names)

    def raw(variables, images):
      return model.apply(variables, norm(images), train=False)

    def forward(variables, images):
      feat, logits = raw(variables, images)
      return losses.l2_normalize(feat), logits

    def embed(variables, images):
      feat, logits = raw(variables, images)
      return losses.l2_normalize(feat), jax.nn.softmax(logits, -1)
    self._raw, self._forward, self._embed = jax.jit(raw), jax.jit(forward), jax.jit(embed)

  @classmethod
  def from_config(cls, config, model, mesh, batch_size: int | None = None) -> "Evaluator":
    return cls(model, pipelines.Normalization.from_config(config.data), mesh,
               pipelines.Loader.from_config(config.data),
               config.eval_batch_size if batch_size is None else batch_size,
               config.data.class_names)

  # ------------------------------------------------------------------------------ one batch

  def logits(self, variables: dict, images) -> jax.Array:
    return self._forward(variables, images)[1]

  def embed(self, variables: dict, images) -> tuple[jax.Array, jax.Array]:
    """(L2-normalised features f, class probabilities): what the adaptation's banks store."""
    return self._embed(variables, images)

  def features(self, variables: dict, images) -> tuple[jax.Array, jax.Array]:
    """(features f as the model outputs them, logits)."""
    return self._raw(variables, images)

  # ----------------------------------------------------------------------------- whole lists

  def _batches(self, fer_list: lists.FerList, desc: str, images=None) -> Iterable[dict]:
    batches = self.loader.eval(fer_list, "test", self.batch_size, images=images)
    return logs.tty_progress(batches, -(-len(fer_list) // self.batch_size), desc)

  def evaluate(self, variables: dict, evals: dict[str, lists.FerList],
               label_free: Sequence[str] = (), keep_probabilities: Sequence[str] = (),
               show: bool = False) -> dict[str, dict]:
    """`summarize` of every list of `evals` ({name: list}) with the test view, each image once;
    the confusion matrix is summed on the devices. The lists named in `label_free` also get the
    label-free selection scores of their predictions ('im', 'snd': selection.py); those named
    in `keep_probabilities` keep their (N, C) class probabilities, in list order, under
    'probabilities'. Each list's line is logged (also on the terminal when `show`)."""
    out = {}
    for name, fl in evals.items():
      total, probs = None, None
      if name in label_free or name in keep_probabilities:
        probs = np.zeros((len(fl), len(self.class_names)), np.float32)
      for host in self._batches(fl, f"eval {name}"):
        b = parallel.shard_batch({k: host[k] for k in ("image", "label", "valid", "index")},
                                 self.mesh)
        logits = self.logits(variables, b["image"])
        cm = _confusion(logits, b["label"], b["valid"], len(self.class_names))
        total = cm if total is None else total + cm
        if probs is not None:
          index, valid = gather_rows(b["index"]), gather_rows(b["valid"])
          p = np.asarray(jax.nn.softmax(gather_rows(logits).astype(np.float32), -1))
          probs[index[valid]] = p[valid]
      if total is None:
        raise ValueError(f"{fl.list_path}: evaluation got no batches")
      out[name] = summarize(np.asarray(jax.device_get(total)))
      if probs is not None and name in label_free:
        out[name].update(selection.scores(probs))
      if probs is not None and name in keep_probabilities:
        out[name]["probabilities"] = probs
      logging.info("%s", format_metrics(name, out[name], self.class_names),
                   extra=logs.SHOW if show else None)
    return out

  def outputs(self, variables: dict, fer_list: lists.FerList, desc: str = "predict",
              images=None) -> dict[str, np.ndarray]:
    """{'features' (N, D) L2-normalised, 'probabilities' (N, C)} of every image of the list
    (test view), in list order, on every process. `images` (uint8 HxWx3 arrays by list index,
    any sizes) replaces the list's files."""
    n = len(fer_list)
    feats = probs = None
    for host in self._batches(fer_list, desc, images):
      b = parallel.shard_batch(host, self.mesh)
      f, logits = self._forward(variables, b["image"])
      f, logits = gather_rows(f).astype(np.float32), gather_rows(logits).astype(np.float32)
      index, valid = gather_rows(b["index"]), gather_rows(b["valid"])
      if feats is None:
        feats = np.zeros((n, f.shape[-1]), np.float32)
        probs = np.zeros((n, logits.shape[-1]), np.float32)
      feats[index[valid]] = f[valid]
      probs[index[valid]] = np.asarray(jax.nn.softmax(logits, -1))[valid]
    return {"features": feats, "probabilities": probs}


CONFUSION_CONVENTION = "rows = true class, columns = predicted class"


def scalars(results: dict[str, dict]) -> dict[str, float]:
  out = {}
  for name, r in results.items():
    out[f"eval/{name}_accuracy"] = r["accuracy"]
    out[f"eval/{name}_mean_class_accuracy"] = r["mean_class_accuracy"]
    if "macro_f1" in r:
      out[f"eval/{name}_macro_f1"] = r["macro_f1"]
    for key in selection.LABEL_FREE:
      if key in r:
        out[f"eval/{name}_{key}"] = r[key]
  return out


def save_confusions(workdir: str, step: int, results: dict[str, dict],
                    class_names: Sequence[str]) -> str:
  """The confusion matrices of an evaluation as `<workdir>/logs/confusion_<step>.json`:
  {"step", "class_names", "confusion_convention", "confusions": {list: [[int]]}} (the original
  pickled bare matrices). Returns the path."""
  path = os.path.join(workdir, "logs", f"confusion_{step:06d}.json")
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"step": int(step), "class_names": [str(c) for c in class_names],
               "confusion_convention": CONFUSION_CONVENTION,
               "confusions": {k: v["confusion"].tolist() for k, v in results.items()}}, f)
  return path
