"""Stage 2: source-free adaptation of the source model to an unlabelled target list (EERCL).

Per step (docs/method.md#adaptation-one-step): EMA update of the teacher, teacher and online
forwards on the three views with grouped batch norm, AaD neighbour consistency over the teacher feature
bank, a relation-weighted contrast of the strong views against cluster labels, and a
relation-weighted InfoNCE against the negative ring buffers. Every `adapt.refresh_every` steps
the online feature and score banks are refreshed by a full pass over the target list and
re-clustered into class prototypes; the training stream then starts a new shuffled epoch, as the
original's data loader does (docs/deviations.md). The loop runs on the shared run skeleton
(`run.py`); this module holds only the stage's own logic.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from eercl_jax import banks as bank_lib
from eercl_jax import checkpoints, evaluation, logs, losses, optim, parallel, records
from eercl_jax.data import lists, pipelines
from eercl_jax.data import resident as resident_lib
from eercl_jax.errors import CheckpointError
from eercl_jax.models import eercl, layers
from eercl_jax import run as run_lib
from eercl_jax.run import Run


@flax.struct.dataclass
class AdaptState:
  step: jax.Array
  params: Any                # online network
  batch_stats: Any
  teacher_params: Any        # EMA teacher
  teacher_batch_stats: Any   # drift through the teacher's own train-mode forwards, never EMA-ed
  opt_state: Any
  rng: jax.Array
  banks: bank_lib.Banks


# ----------------------------------------------------------------------------------------------
# Views and grouped forwards

def _group_views(views, groups: int):
  """[s1, s2, w] (each (B, ...)) -> (3B, ...) ordered so that BN group g holds the g-th slice of
  each view, i.e. the original per-GPU concat [s1_g; s2_g; w_g]."""
  x = jnp.stack(views, 0)                                   # (3, B, ...)
  b = x.shape[1] // groups
  x = x.reshape((3, groups, b) + x.shape[2:])
  x = jnp.swapaxes(x, 0, 1)                                 # (G, 3, b, ...)
  return x.reshape((-1,) + x.shape[3:])


def _ungroup_views(y, groups: int):
  """Inverse of `_group_views` for outputs: (3B, F) -> (3, B, F)."""
  b = y.shape[0] // (3 * groups)
  y = y.reshape((groups, 3, b) + y.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return y.reshape((3, groups * b) + y.shape[3:])


def _teacher_forward(model, params, batch_stats, x, groups, perm_rng, dropout_rng):
  """Shuffle-BN: a shared random permutation of the whole teacher input before grouping, inverted
  after (docs/deviations.md#shuffle-bn-as-a-shared-permutation)."""
  perm = jax.random.permutation(perm_rng, x.shape[0])
  (feat, logits), new_vars = model.apply(
      {"params": params, "batch_stats": batch_stats}, x[perm], train=True, bn_groups=groups,
      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
  inv = jnp.argsort(perm)
  return feat[inv], logits[inv], new_vars["batch_stats"]


# ----------------------------------------------------------------------------------------------
# The adaptation step

@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the adaptation step reads besides the state and the batch (from the config, once)."""
  norm: pipelines.Normalization
  bn_group_size: int
  virtual_devices: int          # W of the original: the AaD term is scaled by 1/W
  num_steps: int                # the AaD dispersion decay's horizon
  ema_decay: float
  aad_weight: float
  aad_neighbours: int
  aad_decay_power: float
  mask_threshold: float
  class_contrast_weight: float
  class_contrast_temp: float
  class_contrast_cluster_labels: bool
  instance_nce_weight: float
  instance_nce_temp: float
  shard_banks: bool

  @classmethod
  def from_config(cls, config) -> "StepSettings":
    a = config.adapt
    return cls(pipelines.Normalization.from_config(config.data), config.bn_group_size,
               config.virtual_devices, config.num_steps, a.ema_decay, a.aad_weight,
               a.aad_neighbours, a.aad_decay_power, a.mask_threshold, a.class_contrast_weight,
               a.class_contrast_temp, a.class_contrast_cluster_labels, a.instance_nce_weight,
               a.instance_nce_temp, a.shard_banks)


def adapt_step(state: AdaptState, batch: dict, *, model, tx, settings: StepSettings, mesh=None,
               num_images=None):
  """One EERCL step. With `settings.shard_banks` the N-row banks are sharded by rows over
  `mesh` (padded to a multiple of the device count; `num_images` rows are real)."""
  a = settings
  groups = layers.num_groups(batch["index"].shape[0], a.bn_group_size)
  views = [a.norm(batch[k]) for k in ("strong1", "strong2", "weak")]
  x = _group_views(views, groups)
  rng = jax.random.fold_in(state.rng, state.step)
  perm_rng, teacher_drop, online_drop = jax.random.split(rng, 3)

  # EMA at the start of the step (a no-op at step 0, when teacher == online).
  teacher_params = jax.tree_util.tree_map(
      lambda t, o: a.ema_decay * t + (1.0 - a.ema_decay) * o, state.teacher_params, state.params)
  t_feat, t_logits, teacher_bs = _teacher_forward(model, teacher_params, state.teacher_batch_stats,
                                                  x, groups, perm_rng, teacher_drop)
  t_feat, t_logits = jax.lax.stop_gradient((t_feat, t_logits))
  q_s1, q_s2, q_w = jax.nn.softmax(_ungroup_views(t_logits, groups), axis=-1)
  t_feat_w = losses.l2_normalize(_ungroup_views(t_feat, groups)[2])

  # The teacher's weak features/probabilities enter the AaD bank before the neighbour query, so
  # each sample finds itself first (dropped) - as the original.
  banks = bank_lib.update_aad_banks(state.banks, batch["index"], t_feat_w, q_w)
  if a.shard_banks:
    neighbours = bank_lib.sharded_aad_neighbour_probs(
        t_feat_w, banks.aad_feat, banks.aad_score, a.aad_neighbours, mesh, num_valid=num_images)
  else:
    neighbours = bank_lib.aad_neighbour_probs(t_feat_w, banks.aad_feat, banks.aad_score,
                                              a.aad_neighbours)
  mask = losses.confidence_mask(q_w, a.mask_threshold)
  relation = banks.relation

  def loss_fn(params):
    (feat, logits), new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, bn_groups=groups,
        rngs={"dropout": online_drop}, mutable=["batch_stats"])
    p_s1, p_s2, p_w = jax.nn.softmax(_ungroup_views(logits, groups), axis=-1)
    f_w = jax.lax.stop_gradient(_ungroup_views(feat, groups)[2])
    attract, disperse = losses.aad_loss(p_w, neighbours)
    decay = (1.0 + 10.0 * state.step / a.num_steps) ** (-a.aad_decay_power)
    # The original computes AaD on the gathered batch but DDP averages the gradient over its W
    # GPUs: the effective loss is 1/W of the global one
    # (docs/deviations.md#aad-scaling-by-the-virtual-device-count).
    aad = a.aad_weight * (attract + decay * disperse) / a.virtual_devices
    if a.class_contrast_cluster_labels:
      labels = losses.batch_cluster_labels(f_w, banks.prototypes)
    else:
      labels = jnp.argmax(q_w, -1)
    t_cc, t_nce = a.class_contrast_temp, a.instance_nce_temp
    contrast = 0.5 * (losses.class_contrast(p_s1, labels, mask, relation, t_cc)
                      + losses.class_contrast(p_s2, labels, mask, relation, t_cc))
    nce = (losses.instance_nce(p_s1, q_w, banks.neg_weak, relation, t_nce)
           + losses.instance_nce(p_w, q_s1, banks.neg_strong, relation, t_nce)
           + losses.instance_nce(p_s1, q_s2, banks.neg_strong, relation, t_nce)) / 3
    total = aad + a.class_contrast_weight * contrast + a.instance_nce_weight * nce
    aux = {"batch_stats": new_vars["batch_stats"], "labels": labels, "attract": attract,
           "disperse": disperse, "contrast": contrast, "nce": nce}
    return total, aux

  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Negatives are this step's teacher outputs, written after the optimiser step.
  banks = bank_lib.update_negative_banks(banks, q_w, q_s1)

  true = batch["label"]  # monitoring only: never reaches a loss
  maskf = mask.astype(jnp.float32)
  metrics = {
      "train/loss": total, "train/aad_attract": aux["attract"],
      "train/aad_disperse": aux["disperse"],
      "train/class_contrast": aux["contrast"], "train/instance_nce": aux["nce"],
      "train/mask": jnp.mean(maskf), "train/mean_max_prob": jnp.mean(jnp.max(q_w, -1)),
      "count/mask": jnp.sum(maskf),
      "count/mask_correct": jnp.sum(maskf * (jnp.argmax(q_w, -1) == true)),
      "count/cluster_mask_correct": jnp.sum(maskf * (aux["labels"] == true)),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"],
                            teacher_params=teacher_params, teacher_batch_stats=teacher_bs,
                            opt_state=opt_state, banks=banks)
  return new_state, metrics


def state_shardings(state: AdaptState, mesh, shard_banks: bool):
  """Everything replicated, except the N-row banks when they are sharded by rows."""
  rep = parallel.replicated(mesh)
  shardings = jax.tree_util.tree_map(lambda _: rep, state)
  if not shard_banks:
    return shardings
  rows = bank_lib.bank_sharding(mesh)
  return shardings.replace(banks=shardings.banks.replace(
      **{name: rows for name in bank_lib.ROW_BANKS}))


# ----------------------------------------------------------------------------------------------
# Bank refresh and clustering (eval mode, full pass over the target list)

@functools.partial(jax.jit, donate_argnums=0, static_argnames=("teacher",))
def write_refresh(banks: bank_lib.Banks, idx, valid, feat, score, label, t_feat, t_score,
                  teacher: bool):
  """One refresh batch's online (and with `teacher`, the teacher's) features and scores written
  into the banks' rows `idx`. Public, like `cluster_banks`, so that tests can lower them."""
  # Rows outside the list (padding, or rows the faithful mode drops) are pointed past the end
  # and dropped by the scatter.
  idx = jnp.where(valid, idx, banks.feat.shape[0])
  banks = banks.replace(feat=banks.feat.at[idx].set(feat, mode="drop"),
                        score=banks.score.at[idx].set(score, mode="drop"),
                        label=banks.label.at[idx].set(label, mode="drop"))
  if teacher:
    banks = banks.replace(aad_feat=banks.aad_feat.at[idx].set(t_feat, mode="drop"),
                          aad_score=banks.aad_score.at[idx].set(t_score, mode="drop"))
  return banks


@functools.partial(jax.jit, static_argnames=("threshold", "num_images"), donate_argnums=0)
def cluster_banks(banks: bank_lib.Banks, threshold: int, num_images: int):
  """The refresh's re-clustering: new prototypes from the online banks' first `num_images`
  rows, with the argmax and cluster accuracies of those rows (monitoring only)."""
  valid = jnp.arange(banks.feat.shape[0]) < num_images   # rows past N pad a sharded bank
  labels, prototypes = losses.cluster_prototypes(banks.feat, banks.score, threshold=threshold,
                                                 valid=valid)
  mean = lambda hits: jnp.sum(jnp.where(valid, hits, False)) / num_images
  argmax_acc = mean(jnp.argmax(banks.score, -1) == banks.label)
  acc = mean(labels == banks.label)
  return banks.replace(prototypes=prototypes), argmax_acc, acc


@dataclasses.dataclass(frozen=True)
class RefreshSettings:
  """What a bank refresh reads besides the state (from the config, once)."""
  view: str                     # 'weak' (the original's random view) | 'test'
  batch_size: int
  seed: int
  cluster_min_size: int
  # The original's drop_last coverage (faithful_bank_init): None, or (W, per-device batch)
  faithful_rows: Optional[tuple[int, int]] = None

  @classmethod
  def from_config(cls, config) -> "RefreshSettings":
    a = config.adapt
    faithful = ((config.virtual_devices, config.batch_size // config.virtual_devices)
                if a.faithful_bank_init else None)
    return cls(a.refresh_view, a.refresh_batch_size, config.seed, a.cluster_min_size, faithful)


def refresh_banks(state: AdaptState, target_list, refresh_index: int, *, evaluator, settings,
                  shardings, with_teacher: bool, resident=None) -> tuple[AdaptState, dict]:
  """Writes the online network's normalised features and probabilities of every target image
  (and, at step 0, the teacher's into the AaD banks), then re-clusters the prototypes.
  `resident` (data/resident.py): the target list held in memory, read with no decode."""
  s = settings
  keep = None
  if s.faithful_rows is not None:
    keep = _faithful_refresh_rows(len(target_list), *s.faithful_rows, s.seed, refresh_index)
  if resident is not None:
    batches = resident.batches(s.view, s.batch_size, s.seed, refresh_index)
  else:
    batches = evaluator.loader.eval(target_list, s.view, s.batch_size, seed=s.seed,
                                    epoch=refresh_index)
  banks = state.banks
  total = -(-len(target_list) // s.batch_size)
  mesh = evaluator.mesh
  for host in logs.tty_progress(batches, total, f"bank refresh {refresh_index}"):
    if keep is not None:
      host = dict(host, valid=host["valid"] & keep[host["index"]])
    b = parallel.shard_batch(host, mesh)
    images = (b["image"] if resident is None
              else resident.images(b, s.view, s.seed, refresh_index))
    feat, score = evaluator.embed({"params": state.params, "batch_stats": state.batch_stats},
                                  images)
    t_feat, t_score = (evaluator.embed({"params": state.teacher_params,
                                        "batch_stats": state.teacher_batch_stats}, images)
                       if with_teacher else (feat, score))
    banks = write_refresh(banks, b["index"], b["valid"], feat, score, b["label"], t_feat,
                          t_score, with_teacher)
  banks, argmax_acc, acc = cluster_banks(banks, s.cluster_min_size, len(target_list))
  banks = jax.device_put(banks, shardings.banks)
  stats = {"refresh/argmax_acc": float(argmax_acc), "refresh/cluster_acc": float(acc)}
  return state.replace(banks=banks), stats


def _faithful_refresh_rows(n: int, w: int, b: int, seed: int, refresh_index: int) -> np.ndarray:
  """The original's drop_last refresh coverage (docs/deviations.md#bank-refresh-coverage):
  each of W virtual devices walks its share of a shuffled list in batches of B and drops its
  final partial batch."""
  per = -(-n // w)
  written = w * b * (per // b)
  order = np.random.default_rng([seed, refresh_index]).permutation(n)
  keep = np.zeros(n, bool)
  keep[order[:written]] = True
  return keep


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


def create_state(config, tx, variables, num_images: int, mesh) -> AdaptState:
  a = config.adapt
  rng, bank_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = variables["params"], variables["batch_stats"]
  g = params["classifier"]["g"]
  if bool(jnp.any(g <= 0)):
    # The relation matrix uses the direction v, as the original; it equals the effective weight
    # g * v / |v| only if every g > 0 (docs/deviations.md#relation-matrix-from-v).
    logging.warning("classifier g has non-positive entries: the relation matrix uses the "
                    "directions v, which then differ from the effective class weights")
  rows = bank_lib.pad_rows(num_images, mesh.devices.size) if a.shard_banks else num_images
  banks = bank_lib.init_banks(bank_rng, rows, config.model.feat_dim,
                              config.model.num_classes, neg_size=a.negative_bank_size,
                              faithful_init=a.faithful_bank_init,
                              zero_negatives=a.zero_negative_banks)
  # Computed once from the frozen classifier (docs/method.md#adaptation-the-relation-matrix).
  banks = banks.replace(relation=losses.relation_matrix(eercl.class_directions(params),
                                                        a.relation_off_diagonal))
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # distinct buffers: the step donates
  state = AdaptState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     teacher_params=copy(params), teacher_batch_stats=copy(batch_stats),
                     opt_state=tx.init(params), rng=rng, banks=banks)
  return jax.device_put(state, state_shardings(state, mesh, a.shard_banks))


# ----------------------------------------------------------------------------------------------
# The stage, wired once

@dataclasses.dataclass(frozen=True)
class AdaptBuild:
  """The adaptation stage, wired once."""
  model: eercl.EERCLModel
  tx: optax.GradientTransformation
  state: AdaptState                  # the initial state, placed with `shardings`
  shardings: AdaptState              # where each part of the state lives on the mesh
  step: Callable                     # jitted (state, sharded batch) -> (state, metrics)
  evaluator: evaluation.Evaluator    # the eval-mode forward (refresh, evaluations)
  # (state, target list, refresh index, *, with_teacher, resident=None) -> (state, stats)
  refresh: Callable


def build(config, mesh, variables: dict, num_images: int,
          evaluator: evaluation.Evaluator | None = None) -> AdaptBuild:
  """Model, optimiser, initial state (banks for `num_images` target images), the jitted step
  and the bank refresh of `config`'s adaptation on `mesh`, starting from the source model's
  `variables` ({'params', 'batch_stats'}; `load_source_variables` reads them)."""
  model = eercl.create_model(config.model)
  tx = optim.for_model(config, frozen=("classifier",) if config.adapt.fix_classifier else ())
  evaluator = evaluator or evaluation.Evaluator.from_config(config, model, mesh)
  state = create_state(config, tx, variables, num_images, mesh)
  shardings = state_shardings(state, mesh, config.adapt.shard_banks)
  step = jax.jit(functools.partial(adapt_step, model=model, tx=tx,
                                   settings=StepSettings.from_config(config), mesh=mesh,
                                   num_images=num_images),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  refresh = functools.partial(refresh_banks, evaluator=evaluator,
                              settings=RefreshSettings.from_config(config), shardings=shardings)
  return AdaptBuild(model, tx, state, shardings, step, evaluator, refresh)


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


ADAPT_LOG_KEYS = (("train/loss", "loss", ".4f"), ("train/aad_attract", "aad_attract", ".4f"),
                  ("train/aad_disperse", "aad_disperse", ".4f"),
                  ("train/class_contrast", "class_contrast", ".4f"),
                  ("train/instance_nce", "instance_nce", ".4f"), ("train/mask", "mask", ".3f"),
                  ("train/mask_acc", "mask_acc", ".3f"),
                  ("train/cluster_mask_acc", "cluster_mask_acc", ".3f"),
                  ("train/mean_max_prob", "mean_max_prob", ".3f"))


def train_and_evaluate(config, workdir: str) -> dict:
  """Adapts the source model; resumes from the latest checkpoint in `workdir`."""
  run = Run(config, workdir, "adapt", log_keys=ADAPT_LOG_KEYS,
            ratios={"train/mask_acc": ("count/mask_correct", "count/mask"),
                    "train/cluster_mask_acc": ("count/cluster_mask_correct", "count/mask")},
            selection_note="oracle selection: uses target labels")
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
    it = run.loader.train(target_list, ("weak", "strong", "strong"), config.batch_size,
                          stream_seed(config.seed, stream))
    if iterator_state is not None:
      it.set_state(iterator_state)
    return it

  it = new_iterator(record.stream, iterator_state)
  a = config.adapt
  resident = resident_lib.for_refresh(target_list, run.mesh, run.loader,
                                      data_format=config.data.format, memory=a.refresh_memory,
                                      device_view=a.refresh_device_view)
  logging.info("adaptation: %d target images, %d steps of %d x 3 views on %d devices",
               len(target_list), config.num_steps, config.batch_size, run.mesh.devices.size)
  for step in run.steps():
    host_batch = run.next_batch(it)  # fetched before the refresh, as the original
    run.show_views(step, host_batch)
    it_index = step - 1    # the original's iteration index
    if it_index % a.refresh_every == 0:
      state, stats = stage.refresh(state, target_list, it_index // a.refresh_every,
                                   with_teacher=it_index == 0, resident=resident)
      run.writer.write_scalars(it_index, stats)
      logging.info("step %d bank refresh: argmax acc %.4f, cluster acc %.4f (monitoring only)",
                   it_index, stats["refresh/argmax_acc"], stats["refresh/cluster_acc"])
      # The refresh ends the epoch: the next batch starts a new shuffled stream.
      record.stream += 1
      it = new_iterator(record.stream)
    state, metrics = stage.step(state, parallel.shard_batch(host_batch, run.mesh))
    run.end_of_step(step, state, metrics, it, record)
  out = run.finish(state, source_only=record.source_only or {})
  out["source_only"] = {k: v["accuracy"] for k, v in (record.source_only or {}).items()}
  return out
