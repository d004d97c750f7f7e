"""Stage 1: supervised training of the EERCL classifier on the labelled source list.

`train_step` is pure maths over a sharded batch; `train_and_evaluate` owns the I/O: data,
evaluation, checkpoints (latest + best by source test accuracy, the original's rule), logs.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from eercl_jax import checkpoints, logs, losses, optim, parallel, train_lib
from eercl_jax.data import pipelines
from eercl_jax.models import eercl, pretrained


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
    variables, _ = pretrained.init_backbone(config.model, variables, config.model.init_from)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=rng)


def train_step(state: TrainState, batch: dict, *, model, tx, config, schedule):
  """One SGD step on label-smoothed cross-entropy; BN statistics over fixed groups."""
  groups = train_lib.bn_groups(batch["image"].shape[0], config.bn_group_size)
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = train_lib.normalize(batch["image"], config)

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
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "train/lr": schedule(state.step) * config.optim.lr_mult["backbone"]}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def compile_train_step(config, model, tx, mesh):
  step = functools.partial(train_step, model=model, tx=tx, config=config,
                           schedule=optim.make_schedule(config.optim))
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`."""
  writer, mesh = train_lib.start_run(config, workdir)
  train_list, evals = train_lib.load_lists(config)

  model = eercl.create_model(config.model)
  tx = optim.make_optimizer(config.optim, eercl.param_groups)
  state = parallel.replicate(create_state(config, model, tx, jax.random.PRNGKey(config.seed)), mesh)
  ckpt = checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  best = {"value": -1.0, "step": -1}
  data_state = None
  restored = ckpt.restore_latest(checkpoints.abstract_like(state))
  if restored is not None:
    state, data_state, meta = restored
    train_lib.check_model_meta(meta, config, ckpt.latest.directory)
    best = meta.get("best", best)
    logging.info("resumed from %s at step %d", ckpt.latest.directory, int(state.step))
  start = int(state.step)

  dataset = pipelines.train_dataset(
      train_list, views=("weak",), view_cfg=train_lib.view_config(config),
      global_batch=config.batch_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers)
  it = iter(dataset)
  if data_state is not None:
    it.set_state(train_lib.decode_data_state(data_state["iterator"]))

  p_step = compile_train_step(config, model, tx, mesh)
  predict = train_lib.make_predict(model, config, mesh)
  progress = logs.Progress(start, config.num_steps)
  logging.info("source training: %d images, %d steps of %d on %d devices (%d processes)",
               len(train_list), config.num_steps, config.batch_size, mesh.devices.size,
               jax.process_count())
  results, running = {}, train_lib.MeanMetrics()
  for step in range(start + 1, config.num_steps + 1):
    batch = parallel.shard_batch(next(it), mesh)
    state, metrics = p_step(state, batch)
    running.add(metrics)
    if step % config.log_every == 0 or step == config.num_steps:
      scalars, _ = running.pop()
      rate, eta = progress.tick(step)
      scalars["train/steps_per_sec"] = rate
      writer.write_scalars(step, scalars)
      logging.info("step %d/%d loss=%.4f acc=%.3f lr=%.2e %.2f steps/s ETA %s", step,
                   config.num_steps, scalars["train/loss"], scalars["train/accuracy"],
                   scalars["train/lr"], rate, eta)
    last = step == config.num_steps
    if step % config.eval_every == 0 or last:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      results = train_lib.evaluate_all(predict, variables, evals, config, mesh)
      writer.write_scalars(step, train_lib.eval_scalars(results))
      train_lib.save_confusions(workdir, step, results)
      value = results[config.data.select_by]["accuracy"]
      if value >= best["value"]:  # ties -> the later checkpoint, as the original
        best = {"value": value, "step": step}
        ckpt.save(step, state, {"iterator": None},
                  train_lib.run_meta(config, step, {"best": best, "selected_by":
                                                     config.data.select_by}), best=True)
        logging.info("new best %s accuracy %.4f at step %d", config.data.select_by, value, step)
    if step % config.checkpoint_every == 0 or last:
      ckpt.save(step, state, {"iterator": train_lib.encode_data_state(it.get_state())},
                train_lib.run_meta(config, step, {"best": best}))
  writer.flush()
  ckpt.close()
  if not results:  # resumed after the last step: evaluate once so the summary is meaningful
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    results = train_lib.evaluate_all(predict, variables, evals, config, mesh)
  summary = {name: r["accuracy"] for name, r in results.items()}
  line = " | ".join(f"{name} accuracy {acc * 100:.2f}%" for name, acc in summary.items())
  logging.info("final (step %d): %s | best %s accuracy %.2f%% at step %d", config.num_steps, line,
               config.data.select_by, best["value"] * 100, best["step"])
  print(f"[source] final: {line}; best {config.data.select_by} {best['value'] * 100:.2f}% "
        f"at step {best['step']}", flush=True)
  return {"final": summary, "best": best, "results": results}
