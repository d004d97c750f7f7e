"""Stage 1: supervised training of the EERCL classifier on the labelled source list.

`train_step` is pure maths over a sharded batch; `train_and_evaluate` is the stage's loop on the
shared run skeleton (`run.py`: resume, logs, evaluation + best checkpoint by source test
accuracy, the original's rule, checkpoints).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from eercl_jax import losses, optim, parallel
from eercl_jax.data import lists, pipelines
from eercl_jax.models import eercl, layers
from eercl_jax.run import Run
from eercl_jax.weights import convert


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def create_state(config, model, tx, rng) -> TrainState:
  init_rng, rng = jax.random.split(rng)
  variables = eercl.init_variables(model, init_rng, config.data.crop)
  if config.model.init_from:
    variables, _ = convert.init_backbone(config.model, variables, config.model.init_from)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=rng)


def train_step(state: TrainState, batch: dict, *, model, tx, config):
  """One SGD step on label-smoothed cross-entropy; BN statistics over fixed groups."""
  groups = layers.num_groups(batch["image"].shape[0], config.bn_group_size)
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = pipelines.normalize(batch["image"], config.data)

  def loss_fn(params):
    (_, logits), new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        bn_groups=groups, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = losses.label_smoothing_cross_entropy(logits, batch["label"], config.label_smoothing)
    return loss, (logits, new_vars["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train/loss": loss,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def compile_train_step(config, model, tx, mesh):
  step = functools.partial(train_step, model=model, tx=tx, config=config)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`."""
  run = Run(config, workdir, "source",
            log_keys=(("train/loss", "loss", ".4f"), ("train/accuracy", "acc", ".3f")))
  train_list, evals = lists.read_run_lists(config.data)
  model = eercl.create_model(config.model)
  tx = optim.for_model(config)
  run.set_evaluation(model, evals)
  state = parallel.replicate(create_state(config, model, tx, jax.random.PRNGKey(config.seed)),
                             run.mesh)
  state, _, iterator_state = run.resume(state)

  it = iter(pipelines.train_dataset(
      train_list, views=("weak",), view_cfg=pipelines.view_config(config.data),
      global_batch=config.batch_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers,
      prefetch=config.data.prefetch))
  if iterator_state is not None:
    it.set_state(iterator_state)
  p_step = compile_train_step(config, model, tx, run.mesh)
  logging.info("source training: %d images, %d steps of %d on %d devices (%d processes)",
               len(train_list), config.num_steps, config.batch_size, run.mesh.devices.size,
               jax.process_count())
  for step in run.steps():
    host_batch = run.next_batch(it)
    run.show_views(step, host_batch)
    state, metrics = p_step(state, parallel.shard_batch(host_batch, run.mesh))
    run.end_of_step(step, state, metrics, it)
  return run.finish(state)
