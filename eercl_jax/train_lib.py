"""Pieces both training stages share: reading the lists, normalisation, evaluation, metadata."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from eercl_jax import evaluation, logs, parallel
from eercl_jax.data import lists as fer_lists
from eercl_jax.data import pipelines, synthetic


def view_config(config) -> pipelines.ViewConfig:
  return pipelines.ViewConfig(resize=config.data.resize, crop=config.data.crop)


def load_lists(config) -> tuple[fer_lists.FerList, dict[str, fer_lists.FerList]]:
  """Validates every list (and its images) before any training starts."""
  d = config.data
  if d.synthetic.enabled:
    params = {k: v for k, v in d.synthetic.items() if k not in ("enabled", "root")}
    if jax.process_index() == 0:  # one writer; the other processes wait for it
      synthetic.ensure_generated(d.synthetic.root, **params)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("synthetic data generated")
  read = lambda path: fer_lists.read_list(path, d.image_root, tuple(d.class_names),
                                          check_images=d.check_images,
                                          skip_bad_images=d.skip_bad_images)
  if len(d.class_names) != config.model.num_classes:
    raise ValueError(f"config.data.class_names has {len(d.class_names)} names but "
                     f"config.model.num_classes is {config.model.num_classes}")
  train = read(d.train_list)
  evals = {name: read(path) for name, path in d.eval_lists.items()}
  if d.select_by not in evals:
    raise ValueError(f"config.data.select_by={d.select_by!r} is not one of config.data.eval_lists "
                     f"{sorted(evals)}")
  for name, fl in [("train", train), *evals.items()]:
    logging.info("list %s: %s (%d images, %d skipped)", name, fl.list_path, len(fl), fl.num_skipped)
  return train, evals


def start_run(config, workdir: str):
  """Log file, metric writer and mesh of a run, and the batch-size checks both stages need,
  before any data is read. Returns (writer, mesh)."""
  logs.setup_file_log(workdir)
  writer = logs.create_writer(workdir)
  mesh = parallel.create_mesh()
  parallel.check_global_batch(config.batch_size, mesh)
  parallel.check_global_batch(config.eval_batch_size, mesh, "eval_batch_size")
  bn_groups(config.batch_size, config.bn_group_size)
  return writer, mesh


def normalize(images: jax.Array, config) -> jax.Array:
  """uint8 NHWC -> float, ImageNet mean/std on 0..255 (done on device to ship uint8)."""
  mean = jnp.asarray(config.data.mean, jnp.float32)
  std = jnp.asarray(config.data.std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def bn_groups(num_images: int, group_size: int, what: str = "batch_size") -> int:
  if num_images % group_size:
    raise ValueError(f"config.{what}={num_images} is not a multiple of config.bn_group_size="
                     f"{group_size}")
  return num_images // group_size


def make_predict(model, config, mesh) -> Callable:
  """Eval-mode logits of `variables` for a sharded uint8 batch."""
  @jax.jit
  def predict(variables, images):
    _, logits = model.apply(variables, normalize(images, config), train=False)
    return logits
  return predict


def evaluate_all(predict, variables, evals: dict, config, mesh) -> dict[str, dict]:
  out = {}
  put = lambda b: parallel.shard_batch(b, mesh)
  for name, fl in evals.items():
    batches = pipelines.eval_batches(
        fl, view="test", view_cfg=view_config(config), batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.data.num_workers)
    out[name] = evaluation.evaluate(lambda x: predict(variables, x), batches,
                                    config.model.num_classes, put)
    logging.info("%s", evaluation.format_metrics(name, out[name], config.data.class_names))
  return out


def eval_scalars(results: dict[str, dict]) -> dict[str, float]:
  scalars = {}
  for name, r in results.items():
    scalars[f"eval/{name}_accuracy"] = r["accuracy"]
    scalars[f"eval/{name}_mean_class_accuracy"] = r["mean_class_accuracy"]
  return scalars


def save_confusions(workdir: str, step: int, results: dict[str, dict]) -> None:
  """Confusion matrices as JSON next to the log (the original pickled them)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "logs", f"confusion_{step:06d}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: v["confusion"].tolist() for k, v in results.items()}, f)


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def run_meta(config, step: int, extra: dict | None = None) -> dict:
  meta = {"stage": config.stage, "step": int(step), "model": config_json(config.model),
          "class_names": list(config.data.class_names), "config": config_json(config)}
  meta.update(extra or {})
  return meta


def check_model_meta(meta: dict, config, where: str) -> None:
  """A checkpoint must match the config's classes and architecture; names what differs."""
  keys = ("backbone", "vit_size", "num_classes", "bottleneck_dim", "width", "feat_dim")
  want = config_json(config.model)
  diffs = [f"model.{k}: checkpoint {meta['model'].get(k)!r} vs config {want.get(k)!r}"
           for k in keys if meta["model"].get(k) != want.get(k)
           and not (want.get("backbone") != "vit" and k == "vit_size")]
  if list(meta.get("class_names", [])) != list(config.data.class_names):
    diffs.append(f"data.class_names: checkpoint {meta.get('class_names')} vs config "
                 f"{list(config.data.class_names)}")
  if diffs:
    raise ValueError(f"checkpoint {where} does not match the config:\n  " + "\n  ".join(diffs))


def encode_data_state(state: Any) -> Any:
  """grain iterator states may hold bytes; JSON needs text."""
  if isinstance(state, bytes):
    return {"__bytes__": state.hex()}
  if isinstance(state, dict):
    return {k: encode_data_state(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [encode_data_state(v) for v in state]
  return state


def decode_data_state(state: Any) -> Any:
  if isinstance(state, dict):
    if set(state) == {"__bytes__"}:
      return bytes.fromhex(state["__bytes__"])
    return {k: decode_data_state(v) for k, v in state.items()}
  if isinstance(state, list):
    return [decode_data_state(v) for v in state]
  return state


class MeanMetrics:
  """Running sums of per-step device metrics, fetched to the host only when logged."""

  def __init__(self):
    self.sums, self.count = {}, 0

  def add(self, metrics: dict) -> None:
    self.sums = {k: self.sums.get(k, 0.0) + v for k, v in metrics.items()}
    self.count += 1

  def pop(self) -> tuple[dict[str, float], dict[str, float]]:
    """(means, sums) since the last pop."""
    sums = to_host_scalars(self.sums)
    means = {k: v / max(self.count, 1) for k, v in sums.items()}
    self.sums, self.count = {}, 0
    return means, sums


def to_host_scalars(metrics: dict) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
