"""Evaluation: eval-mode predictions over the evaluation lists, confusion matrices, accuracy,
per-class and mean class accuracy, and their scalars and JSON files."""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def confusion_matrix(preds, labels, valid, num_classes: int):
  """(C, C) counts, rows = true class, columns = predicted; rows with valid=False are ignored."""
  idx = labels * num_classes + preds
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[idx].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def summarize(confusion: np.ndarray, class_names=None) -> dict:
  confusion = np.asarray(confusion, np.int64)
  total = confusion.sum()
  per_class_n = confusion.sum(axis=1)
  per_class = np.divide(np.diag(confusion), per_class_n, out=np.full(len(confusion), np.nan),
                        where=per_class_n > 0)
  out = {
      "accuracy": float(np.trace(confusion) / max(total, 1)),
      "mean_class_accuracy": float(np.nanmean(per_class)) if np.any(per_class_n > 0) else float("nan"),
      "per_class_accuracy": per_class,
      "confusion": confusion,
      "count": int(total),
  }
  return out


def evaluate(predict: Callable, batches: Iterable[dict], num_classes: int, put: Callable) -> dict:
  """Runs `predict(images) -> logits` over `batches` (dicts with image/label/valid) and sums the
  confusion matrix on device; `put` moves a host batch onto the mesh."""
  total = None
  for batch in batches:
    b = put({"image": batch["image"], "label": batch["label"], "valid": batch["valid"]})
    cm = _batch_confusion(predict(b["image"]), b["label"], b["valid"], num_classes)
    total = cm if total is None else total + cm
  if total is None:
    raise ValueError("evaluation got no batches")
  return summarize(np.asarray(jax.device_get(total)))


def _batch_confusion(logits, labels, valid, num_classes):
  return _confusion_jit(jnp.argmax(logits, -1), labels, valid, num_classes)


_confusion_jit = jax.jit(confusion_matrix, static_argnums=3)


def format_metrics(name: str, summary: dict, class_names) -> str:
  per = " ".join(f"{c}={a * 100:.1f}" for c, a in zip(class_names, summary["per_class_accuracy"]))
  return (f"{name}: acc={summary['accuracy'] * 100:.2f} mean_class_acc="
          f"{summary['mean_class_accuracy'] * 100:.2f} (n={summary['count']}) [{per}]")


def make_predict(model, data_config) -> Callable:
  """jitted (variables, uint8 images) -> eval-mode logits."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import pipelines

  @jax.jit
  def predict(variables, images):
    _, logits = model.apply(variables, pipelines.normalize(images, data_config), train=False)
    return logits
  return predict


def evaluate_lists(predict, variables, evals: dict, config, mesh) -> dict[str, dict]:
  """Every list of `evals` ({name: FerList}) with the test view, each image exactly once."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax import logs, parallel
  from eercl_jax.data import pipelines
  out = {}
  put = lambda b: parallel.shard_batch(b, mesh)
  for name, fl in evals.items():
    batches = pipelines.eval_batches(
        fl, view="test", view_cfg=pipelines.view_config(config.data),
        batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        prefetch=config.data.prefetch)
    batches = logs.tty_progress(batches, -(-len(fl) // config.eval_batch_size), f"eval {name}")
    out[name] = evaluate(lambda x: predict(variables, x), batches, config.model.num_classes, put)
    logging.info("%s", format_metrics(name, out[name], config.data.class_names))
  return out


def scalars(results: dict[str, dict]) -> dict[str, float]:
  out = {}
  for name, r in results.items():
    out[f"eval/{name}_accuracy"] = r["accuracy"]
    out[f"eval/{name}_mean_class_accuracy"] = r["mean_class_accuracy"]
  return out


def save_confusions(workdir: str, step: int, results: dict[str, dict]) -> None:
  """Confusion matrices as JSON next to the log (the original pickled them)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "logs", f"confusion_{step:06d}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: v["confusion"].tolist() for k, v in results.items()}, f)
