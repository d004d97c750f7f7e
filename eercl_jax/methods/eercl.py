"""EERCL (expression-relationship contrastive learning), the method this project ports: an EMA
teacher, AaD neighbour consistency over the teacher's feature bank, a class-relation matrix from
the frozen classifier, a relation-weighted contrast of the strong views against cluster labels,
and a relation-weighted InfoNCE against negative rings (docs/method.md#adaptation-stage).

Per step: EMA update of the teacher, teacher and online forwards on the three views with grouped
batch norm (shuffle-BN for the teacher), the AaD term on the global batch scaled by 1/W, the
class contrast and the instance NCE. Every `adapt.refresh_every` steps the online feature and
score banks are refreshed by a full pass over the target list and re-clustered into class
prototypes (at the first refresh the teacher fills the AaD banks). A loss term whose weight is 0
is neither computed nor logged (the ablations of
docs/method.md#ablations-switching-eercls-terms-off).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging

from eercl_jax import banks as bank_lib
from eercl_jax import losses
from eercl_jax.methods import base
from eercl_jax.models import eercl, layers


# ----------------------------------------------------------------------------------------------
# Views and grouped forwards

def group_views(views, groups: int):
  """[s1, s2, w] (each (B, ...)) -> (3B, ...) ordered so that BN group g holds the g-th slice of
  each view, i.e. the original per-GPU concat [s1_g; s2_g; w_g]."""
  x = jnp.stack(views, 0)                                   # (3, B, ...)
  b = x.shape[1] // groups
  x = x.reshape((3, groups, b) + x.shape[2:])
  x = jnp.swapaxes(x, 0, 1)                                 # (G, 3, b, ...)
  return x.reshape((-1,) + x.shape[3:])


def ungroup_views(y, groups: int):
  """Inverse of `group_views` for outputs: (3B, F) -> (3, B, F)."""
  b = y.shape[0] // (3 * groups)
  y = y.reshape((groups, 3, b) + y.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return y.reshape((3, groups * b) + y.shape[3:])


def teacher_forward(model, params, batch_stats, x, groups, perm_rng, dropout_rng):
  """Shuffle-BN: a shared random permutation of the whole teacher input before grouping, inverted
  after (docs/deviations.md#shuffle-bn-as-a-shared-permutation)."""
  perm = jax.random.permutation(perm_rng, x.shape[0])
  (feat, logits), new_vars = model.apply(
      {"params": params, "batch_stats": batch_stats}, x[perm], train=True, bn_groups=groups,
      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
  inv = jnp.argsort(perm)
  return feat[inv], logits[inv], new_vars["batch_stats"]


# ----------------------------------------------------------------------------------------------
# The step

@dataclasses.dataclass(frozen=True)
class Settings:
  """EERCL's settings (config.adapt, and the run-level W), read once."""
  virtual_devices: int          # W of the original: the AaD term is scaled by 1/W
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
  def from_config(cls, config) -> "Settings":
    a = config.adapt
    return cls(config.virtual_devices, a.ema_decay, a.aad_weight, a.aad_neighbours,
               a.aad_decay_power, a.mask_threshold, a.class_contrast_weight,
               a.class_contrast_temp, a.class_contrast_cluster_labels, a.instance_nce_weight,
               a.instance_nce_temp, a.shard_banks)


def adapt_step(state: base.AdaptState, batch: dict, ctx: base.StepContext, settings: Settings):
  """One EERCL step. With `settings.shard_banks` the N-row banks are sharded by rows over
  `ctx.mesh` (padded to a multiple of the device count; `ctx.num_images` rows are real)."""
  a, model = settings, ctx.model
  use_aad = a.aad_weight != 0
  use_contrast = a.class_contrast_weight != 0
  use_nce = a.instance_nce_weight != 0
  groups = layers.num_groups(batch["index"].shape[0], ctx.bn_group_size)
  views = [ctx.norm(batch[k]) for k in ("strong1", "strong2", "weak")]
  x = group_views(views, groups)
  rng = jax.random.fold_in(state.rng, state.step)
  perm_rng, teacher_drop, online_drop = jax.random.split(rng, 3)

  # EMA at the start of the step (a no-op at step 0, when teacher == online).
  teacher_params = jax.tree_util.tree_map(
      lambda t, o: a.ema_decay * t + (1.0 - a.ema_decay) * o, state.teacher_params, state.params)
  t_feat, t_logits, teacher_bs = teacher_forward(model, teacher_params, state.teacher_batch_stats,
                                                 x, groups, perm_rng, teacher_drop)
  t_feat, t_logits = jax.lax.stop_gradient((t_feat, t_logits))
  q_s1, q_s2, q_w = jax.nn.softmax(ungroup_views(t_logits, groups), axis=-1)
  t_feat_w = losses.l2_normalize(ungroup_views(t_feat, groups)[2])

  banks = state.banks
  neighbours = None
  if use_aad:
    # The teacher's weak features/probabilities enter the AaD bank before the neighbour query,
    # so each sample finds itself first (dropped) - as the original.
    banks = bank_lib.update_aad_banks(banks, batch["index"], t_feat_w, q_w)
    if a.shard_banks:
      neighbours = bank_lib.sharded_aad_neighbour_probs(
          t_feat_w, banks.aad_feat, banks.aad_score, a.aad_neighbours, ctx.mesh,
          num_valid=ctx.num_images)
    else:
      neighbours = bank_lib.aad_neighbour_probs(t_feat_w, banks.aad_feat, banks.aad_score,
                                                a.aad_neighbours)
  mask = losses.confidence_mask(q_w, a.mask_threshold)
  relation = banks.relation

  def loss_fn(params):
    (feat, logits), new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, bn_groups=groups,
        rngs={"dropout": online_drop}, mutable=["batch_stats"])
    p_s1, p_s2, p_w = jax.nn.softmax(ungroup_views(logits, groups), axis=-1)
    f_w = jax.lax.stop_gradient(ungroup_views(feat, groups)[2])
    total, aux = 0.0, {"batch_stats": new_vars["batch_stats"]}
    if use_aad:
      attract, disperse = losses.aad_loss(p_w, neighbours)
      decay = (1.0 + 10.0 * state.step / ctx.num_steps) ** (-a.aad_decay_power)
      # The original computes AaD on the gathered batch but DDP averages the gradient over its
      # W GPUs: the effective loss is 1/W of the global one
      # (docs/deviations.md#aad-scaling-by-the-virtual-device-count).
      total = a.aad_weight * (attract + decay * disperse) / a.virtual_devices
      aux.update(attract=attract, disperse=disperse)
    if use_contrast:
      if a.class_contrast_cluster_labels:
        labels = losses.batch_cluster_labels(f_w, banks.prototypes)
      else:
        labels = jnp.argmax(q_w, -1)
      t_cc = a.class_contrast_temp
      contrast = 0.5 * (losses.class_contrast(p_s1, labels, mask, relation, t_cc)
                        + losses.class_contrast(p_s2, labels, mask, relation, t_cc))
      total = total + a.class_contrast_weight * contrast
      aux.update(labels=labels, contrast=contrast)
    if use_nce:
      t_nce = a.instance_nce_temp
      nce = (losses.instance_nce(p_s1, q_w, banks.neg_weak, relation, t_nce)
             + losses.instance_nce(p_w, q_s1, banks.neg_strong, relation, t_nce)
             + losses.instance_nce(p_s1, q_s2, banks.neg_strong, relation, t_nce)) / 3
      total = total + a.instance_nce_weight * nce
      aux.update(nce=nce)
    return total, aux

  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = base.Method.apply_gradients(state, grads, ctx.tx)
  if use_nce:
    # Negatives are this step's teacher outputs, written after the optimiser step.
    banks = bank_lib.update_negative_banks(banks, q_w, q_s1)

  metrics = {"train/loss": total, "train/mean_max_prob": jnp.mean(jnp.max(q_w, -1))}
  if use_aad:
    metrics.update({"train/aad_attract": aux["attract"], "train/aad_disperse": aux["disperse"]})
  if use_contrast:
    true = batch["label"]  # monitoring only: never reaches a loss
    maskf = mask.astype(jnp.float32)
    metrics.update({
        "train/class_contrast": aux["contrast"], "train/mask": jnp.mean(maskf),
        "count/mask": jnp.sum(maskf),
        "count/mask_correct": jnp.sum(maskf * (jnp.argmax(q_w, -1) == true)),
        "count/cluster_mask_correct": jnp.sum(maskf * (aux["labels"] == true))})
  if use_nce:
    metrics["train/instance_nce"] = aux["nce"]
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"],
                            teacher_params=teacher_params, teacher_batch_stats=teacher_bs,
                            opt_state=opt_state, banks=banks)
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Bank refresh and clustering (eval mode, full pass over the target list)

@functools.partial(jax.jit, donate_argnums=0, static_argnames=("teacher",))
def write_refresh(banks: bank_lib.Banks, idx, valid, feat, score, label, t_feat, t_score,
                   teacher: bool):
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
def cluster(banks: bank_lib.Banks, threshold: int, num_images: int):
  valid = jnp.arange(banks.feat.shape[0]) < num_images   # rows past N pad a sharded bank
  labels, prototypes = losses.cluster_prototypes(banks.feat, banks.score, threshold=threshold,
                                                 valid=valid)
  mean = lambda hits: jnp.sum(jnp.where(valid, hits, False)) / num_images
  argmax_acc = mean(jnp.argmax(banks.score, -1) == banks.label)
  acc = mean(labels == banks.label)
  return banks.replace(prototypes=prototypes), argmax_acc, acc


# ----------------------------------------------------------------------------------------------
# The method

class Method(base.Method):
  name = "eercl"
  refresh_name = "bank refresh"
  paper = ("Enhancing Cross-Domain Facial Expression Recognition with Expression Relationship "
           "Contrastive Learning in a Source-Free Setting")
  views = ("weak", "strong", "strong")
  teacher = True
  refresh_with_teacher = True
  log_keys = (("train/loss", "loss", ".4f"), ("train/aad_attract", "aad_attract", ".4f"),
              ("train/aad_disperse", "aad_disperse", ".4f"),
              ("train/class_contrast", "class_contrast", ".4f"),
              ("train/instance_nce", "instance_nce", ".4f"), ("train/mask", "mask", ".3f"),
              ("train/mask_acc", "mask_acc", ".3f"),
              ("train/cluster_mask_acc", "cluster_mask_acc", ".3f"),
              ("train/mean_max_prob", "mean_max_prob", ".3f"))
  ratios = {"train/mask_acc": ("count/mask_correct", "count/mask"),
            "train/cluster_mask_acc": ("count/cluster_mask_correct", "count/mask")}

  def __init__(self, config):
    super().__init__(config)
    a = config.adapt
    self.settings = Settings.from_config(config)
    self.refresh_view = a.refresh_view
    self.refresh_every = a.refresh_every
    self.cluster_min_size = a.cluster_min_size
    self.fix_classifier = a.fix_classifier
    self.feat_dim, self.num_classes = config.model.feat_dim, config.model.num_classes
    self.negative_bank_size = a.negative_bank_size
    self.faithful_bank_init, self.zero_negative_banks = (a.faithful_bank_init,
                                                         a.zero_negative_banks)
    self.relation_off_diagonal = a.relation_off_diagonal
    if not a.class_contrast_weight:   # the ratios divide counts the contrast term makes
      self.ratios = {}

  def frozen_groups(self) -> tuple[str, ...]:
    return ("classifier",) if self.fix_classifier else ()

  def init_banks(self, rng, num_images: int, params, mesh):
    if bool(jnp.any(params["classifier"]["g"] <= 0)):
      # The relation matrix uses the direction v, as the original; it equals the effective
      # weight g * v / |v| only if every g > 0 (docs/deviations.md#relation-matrix-from-v).
      logging.warning("classifier g has non-positive entries: the relation matrix uses the "
                      "directions v, which then differ from the effective class weights")
    rows = (bank_lib.pad_rows(num_images, mesh.devices.size) if self.settings.shard_banks
            else num_images)
    banks = bank_lib.init_banks(rng, rows, self.feat_dim, self.num_classes,
                                neg_size=self.negative_bank_size,
                                faithful_init=self.faithful_bank_init,
                                zero_negatives=self.zero_negative_banks)
    # Computed once from the frozen classifier (docs/method.md#adaptation-the-relation-matrix).
    return banks.replace(relation=losses.relation_matrix(eercl.class_directions(params),
                                                         self.relation_off_diagonal))

  def bank_shardings(self, banks, mesh):
    shardings = super().bank_shardings(banks, mesh)
    if not self.settings.shard_banks:
      return shardings
    rows = bank_lib.bank_sharding(mesh)
    return shardings.replace(**{name: rows for name in bank_lib.ROW_BANKS})

  def step(self, state, batch, ctx):
    return adapt_step(state, batch, ctx, self.settings)

  def refresh(self, state, target_list, refresh_index, ctx, *, with_teacher, resident=None):
    """Writes the online network's normalised features and probabilities of every target image
    (and, at step 0, the teacher's into the AaD banks), then re-clusters the prototypes."""
    banks = state.banks
    for b, images in ctx.batches(target_list, self.refresh_view, refresh_index, resident,
                                 "bank refresh"):
      feat, score = ctx.evaluator.embed(
          {"params": state.params, "batch_stats": state.batch_stats}, images)
      t_feat, t_score = (ctx.evaluator.embed({"params": state.teacher_params,
                                              "batch_stats": state.teacher_batch_stats}, images)
                         if with_teacher else (feat, score))
      banks = write_refresh(banks, b["index"], b["valid"], feat, score, b["label"], t_feat,
                            t_score, with_teacher)
    banks, argmax_acc, acc = cluster(banks, self.cluster_min_size, len(target_list))
    banks = jax.device_put(banks, ctx.shardings.banks)
    stats = {"refresh/argmax_acc": float(argmax_acc), "refresh/cluster_acc": float(acc)}
    return state.replace(banks=banks), stats
