"""Stage 2: source-free adaptation of the source model to an unlabelled target list.

The adaptation loop is shared by every method (eercl_jax/methods/: EERCL, the project's method,
and the baselines a paper table puts beside it). `build` wires the stage once - the method, the
model, the optimiser over the parameters the method trains, the initial state with the method's
own state, the jitted step and the refresh - for every caller (the loop below, the benchmark,
the tools, the tests); `train_and_evaluate` is the loop on the shared run skeleton (`run.py`):
before the step of iteration `it` it runs the method's refresh when due (a full pass over the
target list: bank refills, clustering, pseudo-labels, BN statistics), after which the training
stream starts a new shuffled epoch, as the original EERCL's data loader does
(docs/deviations.md#new-shuffled-stream-after-each-refresh).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from eercl_jax import checkpoints, config_defaults, evaluation, methods, optim, parallel, records
from eercl_jax.data import pipelines
from eercl_jax.data import resident as resident_lib
from eercl_jax.errors import CheckpointError
from eercl_jax.methods.base import AdaptState, RefreshContext, StepContext
from eercl_jax.models import eercl
from eercl_jax import run as run_lib
from eercl_jax.run import Run


# ----------------------------------------------------------------------------------------------
# Source checkpoint -> initial state

def load_source_variables(config, model, mesh) -> tuple[dict, int]:
  """{'params', 'batch_stats'} of the source run named by `config.source_checkpoint` (its
  best/ checkpoint, the original's best_model.pth), checked against the config."""
  directory = checkpoints.resolve_run_dir(config.source_checkpoint, "best",
                                          what="config.source_checkpoint")
  step, meta = checkpoints.read_meta(directory)
  if meta.get("stage") != "source":
    raise CheckpointError(f"config.source_checkpoint: {directory} holds a checkpoint of an "
                          f"{meta.get('stage')!r} run; name a source run's workdir")
  checkpoints.check_model_meta(meta, config, directory)
  variables, _ = checkpoints.restore_variables(directory, model, config.data.crop,
                                               parallel.replicated(mesh), step=step)
  bad = run_lib.non_finite_paths(variables)
  if bad:
    raise CheckpointError(f"the source model in {directory} (step {step}) holds non-finite "
                          f"values in {', '.join(bad[:5])}: refusing to adapt it")
  logging.info("loaded source model from %s (step %d)", directory, step)
  return variables, step


def take_from_source(config) -> dict[str, Any]:
  """Fills the fields the adaptation config leaves to its source (config_defaults.FROM_SOURCE:
  the architecture and the input size, None) from the source checkpoint's recorded config;
  returns {key: value} of what was taken. Fields the config sets are checked against the
  checkpoint when it is restored (checkpoints.check_model_meta)."""
  missing = config_defaults.unset_from_source(config)
  if not missing:
    return {}
  directory = checkpoints.resolve_run_dir(config.source_checkpoint, "best",
                                          what="config.source_checkpoint")
  _, meta = checkpoints.read_meta(directory)
  stored = meta.get("config", {})
  taken = {}
  for key in missing:
    group, field = key.split(".")
    value = stored.get(group, {}).get(field)
    if value is None and key == "model.size":   # older checkpoints: the backbone's default
      value = meta.get("arch", {}).get("size")
    if value is None:
      raise CheckpointError(f"config.{key} is left to the source checkpoint, but {directory} "
                            f"does not record it: set --config.{key}")
    config[group][field] = value
    taken[key] = value
  return taken


def state_shardings(state: AdaptState, method, mesh) -> AdaptState:
  """Everything replicated, except what the method places otherwise (EERCL's N-row banks when
  they are sharded by rows)."""
  rep = parallel.replicated(mesh)
  shardings = jax.tree_util.tree_map(lambda _: rep, state)
  if state.banks is None:
    return shardings
  return shardings.replace(banks=method.bank_shardings(state.banks, mesh))


def create_state(config, method, tx, variables, num_images: int, mesh) -> AdaptState:
  """The initial state: the source model as the online network (and the teacher, for a method
  with one), the optimiser's state, the method's own state, placed on the mesh."""
  rng, bank_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = variables["params"], variables["batch_stats"]
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # distinct buffers: the step donates
  state = AdaptState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), rng=rng,
                     teacher_params=copy(params) if method.teacher else None,
                     teacher_batch_stats=copy(batch_stats) if method.teacher else None,
                     banks=method.init_banks(bank_rng, num_images, params, mesh))
  return jax.device_put(state, state_shardings(state, method, mesh))


# ----------------------------------------------------------------------------------------------
# The stage, wired once

@dataclasses.dataclass(frozen=True)
class AdaptBuild:
  """The adaptation stage, wired once."""
  method: Any                        # methods.base.Method
  model: eercl.EERCLModel
  tx: optax.GradientTransformation
  state: AdaptState                  # the initial state, placed with `shardings`
  shardings: AdaptState              # where each part of the state lives on the mesh
  step: Callable                     # jitted (state, sharded batch) -> (state, metrics)
  evaluator: evaluation.Evaluator    # the eval-mode forward (refresh, evaluations)
  # (state, target list, refresh index, *, with_teacher, resident=None) -> (state, stats)
  refresh: Callable


def refresh_context(config, evaluator, shardings) -> RefreshContext:
  a = config.adapt
  faithful = ((config.virtual_devices, config.batch_size // config.virtual_devices)
              if config.method == "eercl" and a.faithful_bank_init else None)
  return RefreshContext(evaluator, shardings, a.refresh_batch_size, config.seed, faithful)


def build(config, mesh, variables: dict, num_images: int,
          evaluator: evaluation.Evaluator | None = None) -> AdaptBuild:
  """The method `config.method`, model, optimiser, initial state (the method's state for
  `num_images` target images), the jitted step and the refresh of `config`'s adaptation on
  `mesh`, starting from the source model's `variables` ({'params', 'batch_stats'};
  `load_source_variables` reads them)."""
  method = methods.create(config)
  model = eercl.create_model(config.model)
  tx = optim.for_model(config, frozen=method.frozen_groups(), trainable=method.trainable)
  evaluator = evaluator or evaluation.Evaluator.from_config(config, model, mesh)
  state = create_state(config, method, tx, variables, num_images, mesh)
  shardings = state_shardings(state, method, mesh)
  ctx = StepContext(model=model, tx=tx, norm=pipelines.Normalization.from_config(config.data),
                    bn_group_size=config.bn_group_size, num_steps=config.num_steps,
                    num_images=num_images, mesh=mesh)
  step = jax.jit(functools.partial(method.step, ctx=ctx),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  refresh = functools.partial(method.refresh,
                              ctx=refresh_context(config, evaluator, shardings))
  return AdaptBuild(method, model, tx, state, shardings, step, evaluator, refresh)


# ----------------------------------------------------------------------------------------------
# The loop

@dataclasses.dataclass
class AdaptRecord:
  """What the adaptation loop remembers across a resume (saved in the checkpoint metadata)."""
  # {list: {'accuracy', 'mean_class_accuracy'}} of the source model, before step 1
  source_only: Optional[dict] = None
  stream: int = 0                      # index of the shuffled training stream (one per refresh)


def stream_seed(seed: int, stream: int) -> int:
  """The shuffling seed of the training stream number `stream` (a new one after each refresh)."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def train_and_evaluate(config, workdir: str) -> dict:
  """Adapts the source model with `config.method`; resumes from the latest checkpoint in
  `workdir`."""
  taken = take_from_source(config)     # before the config is checked and recorded
  method = methods.create(config)
  oracle = config.data.select_by == "target"
  run = Run(config, workdir, "adapt", log_keys=method.log_keys, ratios=method.ratios,
            selection_note="oracle selection: uses target labels" if oracle else "",
            label_free="target" in config.data.eval_lists)
  if taken:
    logging.info("taken from the source checkpoint %s: %s", config.source_checkpoint,
                 ", ".join(f"{k}={v!r}" for k, v in taken.items()))
  target_list, evals = run.read_lists()
  variables, _ = load_source_variables(config, eercl.create_model(config.model), run.mesh)
  stage = build(config, run.mesh, variables, len(target_list))
  run.set_evaluation(stage.model, evals, stage.evaluator)
  state, record, iterator_state = run.resume(stage.state, AdaptRecord())

  if record.source_only is None and config.eval_at_start:
    # The source model on the same evaluation, for the side-by-side summary (step 0).
    results = run.evaluate(0, {"params": state.params, "batch_stats": state.batch_stats},
                           save_confusions=False)
    record.source_only = {k: records.scores(r) for k, r in results.items()}

  def new_iterator(stream: int, iterator_state=None):
    it = run.loader.train(target_list, stage.method.views, config.batch_size,
                          stream_seed(config.seed, stream))
    if iterator_state is not None:
      it.set_state(iterator_state)
    return it

  it = new_iterator(record.stream, iterator_state)
  a = config.adapt
  resident = resident_lib.for_refresh(target_list, run.mesh, run.loader,
                                      data_format=config.data.format, memory=a.refresh_memory,
                                      device_view=a.refresh_device_view)
  logging.info("adaptation (%s): %d target images, %d steps of %d x %d view(s) on %d devices",
               stage.method.name, len(target_list), config.num_steps, config.batch_size,
               len(stage.method.views), run.mesh.devices.size)
  every = max(stage.method.refresh_every, 1)
  for step in run.steps():
    host_batch = run.next_batch(it)  # fetched before the refresh, as the original
    run.show_views(step, host_batch)
    it_index = step - 1    # the original's iteration index
    if stage.method.refresh_due(it_index):
      state, stats = stage.refresh(
          state, target_list, it_index // every,
          with_teacher=it_index == 0 and stage.method.refresh_with_teacher, resident=resident)
      run.writer.write_scalars(it_index, stats)
      logging.info("step %d %s: %s (monitoring only)", it_index, stage.method.refresh_name,
                   ", ".join(f"{k.split('/')[-1].replace('_', ' ')} {v:.4f}"
                             for k, v in stats.items()))
      # The refresh ends the epoch: the next batch starts a new shuffled stream.
      record.stream += 1
      it = new_iterator(record.stream)
    state, metrics = stage.step(state, parallel.shard_batch(host_batch, run.mesh))
    run.end_of_step(step, state, metrics, it, record)
  out = run.finish(state, source_only=record.source_only or {})
  out["source_only"] = {k: v["accuracy"] for k, v in (record.source_only or {}).items()}
  return out
