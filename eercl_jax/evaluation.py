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
  """Accuracy, mean class accuracy (classes without images left out), per-class accuracy (NaN
  for a class without images), the confusion matrix and the image count."""
  confusion = np.asarray(confusion, np.int64)
  total = confusion.sum()
  per_class_n = confusion.sum(axis=1)
  per_class = np.divide(np.diag(confusion), per_class_n, out=np.full(len(confusion), np.nan),
                        where=per_class_n > 0)
  return {
      "accuracy": float(np.trace(confusion) / max(total, 1)),
      "mean_class_accuracy": (float(np.nanmean(per_class)) if np.any(per_class_n > 0)
                              else float("nan")),
      "per_class_accuracy": per_class,
      "confusion": confusion,
      "count": int(total),
  }


def format_metrics(name: str, summary: dict, class_names) -> str:
  per = " ".join(f"{c}={a * 100:.1f}" for c, a in zip(class_names, summary["per_class_accuracy"]))
  free = "".join(f" {k}={summary[k]:.4f}" for k in selection.LABEL_FREE if k in summary)
  return (f"{name}: acc={summary['accuracy'] * 100:.2f} mean_class_acc="
          f"{summary['mean_class_accuracy'] * 100:.2f}{free} (n={summary['count']}) [{per}]")


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
               label_free: Sequence[str] = ()) -> dict[str, dict]:
    """`summarize` of every list of `evals` ({name: list}) with the test view, each image once;
    the confusion matrix is summed on the devices. The lists named in `label_free` also get the
    label-free selection scores of their predictions ('im', 'snd': selection.py)."""
    out = {}
    for name, fl in evals.items():
      total, probs = None, None
      if name in label_free:
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
      if probs is not None:
        out[name].update(selection.scores(probs))
      logging.info("%s", format_metrics(name, out[name], self.class_names))
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


def scalars(results: dict[str, dict]) -> dict[str, float]:
  out = {}
  for name, r in results.items():
    out[f"eval/{name}_accuracy"] = r["accuracy"]
    out[f"eval/{name}_mean_class_accuracy"] = r["mean_class_accuracy"]
    for key in selection.LABEL_FREE:
      if key in r:
        out[f"eval/{name}_{key}"] = r[key]
  return out


def save_confusions(workdir: str, step: int, results: dict[str, dict]) -> None:
  """Confusion matrices as JSON next to the log (the original pickled them)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "logs", f"confusion_{step:06d}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: v["confusion"].tolist() for k, v in results.items()}, f)
