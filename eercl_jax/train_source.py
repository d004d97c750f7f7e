"""Stage 1: supervised training of the EERCL classifier on the labelled source list.

`build` wires the stage once - model, optimiser, initial state, the jitted step - for every
caller (the loop below, the benchmark, the tools, the tests); `train_step` is pure maths over a
sharded batch; `train_and_evaluate` is the stage's loop on the shared run skeleton (`run.py`:
resume, logs, evaluation + best checkpoint by source test accuracy, the original's rule,
checkpoints).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from eercl_jax import losses, optim, parallel
from eercl_jax.data import pipelines
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


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the source step reads besides the state and the batch."""
  norm: pipelines.Normalization
  bn_group_size: int
  label_smoothing: float


def train_step(state: TrainState, batch: dict, *, model, tx, settings: StepSettings):
  """One SGD step on label-smoothed cross-entropy; BN statistics over fixed groups."""
  groups = layers.num_groups(batch["image"].shape[0], settings.bn_group_size)
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = settings.norm(batch["image"])

  def loss_fn(params):
    (_, logits), new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        bn_groups=groups, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = losses.label_smoothing_cross_entropy(logits, batch["label"], settings.label_smoothing)
    return loss, (logits, new_vars["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train/loss": loss,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class SourceBuild:
  """The source stage, wired once."""
  model: eercl.EERCLModel
  tx: optax.GradientTransformation
  state: TrainState                  # the initial state, replicated on the mesh
  step: Callable                     # jitted (state, sharded batch) -> (state, metrics)


def build(config, mesh, variables: dict | None = None) -> SourceBuild:
  """Model, optimiser, initial state and jitted step of `config`'s source stage on `mesh`.
  `variables` ({'params', 'batch_stats'}) replace the initial ones (default: initialised from
  `config.seed`, the backbone then loaded from `config.model.init_from` when set)."""
  model = eercl.create_model(config.model)
  tx = optim.for_model(config)
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if variables is None:
    variables = eercl.init_variables(model, init_rng, config.data.crop)
    if config.model.init_from:
      variables, _ = convert.init_backbone(config.model, variables, config.model.init_from)
  params = variables["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=rng)
  settings = StepSettings(pipelines.Normalization.from_config(config.data),
                          config.bn_group_size, config.label_smoothing)
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, settings=settings),
                 in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
  return SourceBuild(model, tx, parallel.replicate(state, mesh), step)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`."""
  run = Run(config, workdir, "source",
            log_keys=(("train/loss", "loss", ".4f"), ("train/accuracy", "acc", ".3f")))
  train_list, evals = run.read_lists()
  stage = build(config, run.mesh)
  run.set_evaluation(stage.model, evals)
  state, _, iterator_state = run.resume(stage.state)

  it = run.loader.train(train_list, ("weak",), config.batch_size, config.seed)
  if iterator_state is not None:
    it.set_state(iterator_state)
  logging.info("source training: %d images, %d steps of %d on %d devices (%d processes)",
               len(train_list), config.num_steps, config.batch_size, run.mesh.devices.size,
               jax.process_count())
  for step in run.steps():
    host_batch = run.next_batch(it)
    run.show_views(step, host_batch)
    state, metrics = stage.step(state, parallel.shard_batch(host_batch, run.mesh))
    run.end_of_step(step, state, metrics, it)
  return run.finish(state)
