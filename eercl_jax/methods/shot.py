"""SHOT (Liang et al., "Do we really need to access the source data? Source hypothesis transfer
for unsupervised domain adaptation", ICML 2020), as its authors' `object/image_target.py`.

The classifier (the hypothesis) is frozen; everything before it is trained with information
maximisation - the mean per-image entropy minus the entropy of the batch's mean prediction,
both with epsilon 1e-5 inside the log (`gent`) - plus `cls_par` x the cross-entropy to
pseudo-labels. The pseudo-labels come from a full pass over the target list (eval mode, the
test view) every `num_steps // interval` steps, the first before any update: SHOT's weighted
k-means in cosine distance, two rounds, on the features with a column of ones appended
(`obtain_label`), which is `losses.cluster_prototypes` on those features. Defaults (the authors'):
cls_par 0.3, ent_par 1.0, epsilon 1e-5, gent on, interval 15, labelset threshold 0; the
optimiser of the `method=shot` recipe of configs/adapt.py: SGD (Nesterov, momentum 0.9, coupled
weight decay 1e-3), lr 1e-2 with lr x (1 + 10 p)^-0.75, the backbone at 0.1x.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from eercl_jax import losses
from eercl_jax.methods import base
from eercl_jax.models import layers


@flax.struct.dataclass
class Banks:
  labels: jax.Array            # (N,) int32: the pseudo-label of every target image


@functools.partial(jax.jit, static_argnames=("threshold", "num_images"))
def obtain_label(features, probs, *, threshold: int, num_images: int):
  """SHOT's `obtain_label` on the (N, D) features f and (N, C) probabilities of the target
  list: the clustering of `losses.cluster_prototypes` on [f, 1] (the column of ones SHOT
  appends before the cosine distance). Returns (labels (N,), accuracy of the argmax labels)."""
  feats = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], 1)
  valid = jnp.arange(features.shape[0]) < num_images
  labels, _ = losses.cluster_prototypes(feats, probs, threshold=threshold, valid=valid)
  return labels


def im_loss(probs, ent_par: float, gent: bool, epsilon: float):
  """SHOT's information maximisation: ent_par x (mean_i H(p_i) - H(mean_i p_i)), the per-image
  entropy with 1e-5 (the authors' `loss.Entropy`), the diversity's with `epsilon`."""
  ent = jnp.mean(base.entropy(probs, 1e-5))
  if not gent:
    return ent_par * ent, ent, jnp.zeros(())
  m = jnp.mean(probs, 0)
  div = -jnp.sum(m * jnp.log(m + epsilon))
  return ent_par * (ent - div), ent, div


class Method(base.Method):
  name = "shot"
  refresh_name = "pseudo-labels"
  paper = ("Liang et al., Do we really need to access the source data? Source hypothesis "
           "transfer for unsupervised domain adaptation (ICML 2020)")
  log_keys = (("train/loss", "loss", ".4f"), ("train/ent", "ent", ".4f"),
              ("train/div", "div", ".4f"), ("train/pseudo_ce", "pseudo_ce", ".4f"),
              ("train/pseudo_acc", "pseudo_acc", ".3f"))

  def __init__(self, config):
    super().__init__(config)
    s = config.shot
    self.cls_par, self.ent_par, self.epsilon, self.gent = s.cls_par, s.ent_par, s.epsilon, s.gent
    self.threshold = s.threshold
    self.refresh_view = s.view
    # The authors' interval_iter = max_iter // interval: pseudo-labels `interval` times a run.
    self.refresh_every = max(1, config.num_steps // s.interval)

  def frozen_groups(self):
    return ("classifier",)

  def init_banks(self, rng, num_images, params, mesh):
    return Banks(labels=jnp.zeros((num_images,), jnp.int32))

  def step(self, state, batch, ctx):
    x = ctx.norm(batch["image"])
    groups = layers.num_groups(x.shape[0], ctx.bn_group_size)
    rng = jax.random.fold_in(state.rng, state.step)
    pseudo = state.banks.labels[batch["index"]]

    def loss_fn(params):
      _, logits, batch_stats = base.forward(ctx.model, params, state.batch_stats, x,
                                            groups=groups, rng=rng)
      probs = jax.nn.softmax(logits, -1)
      logp = jax.nn.log_softmax(logits, -1)
      ce = jnp.mean(-jnp.take_along_axis(logp, pseudo[:, None], -1)[:, 0])
      im, ent, div = im_loss(probs, self.ent_par, self.gent, self.epsilon)
      total = im + self.cls_par * ce if self.cls_par else im
      return total, (batch_stats, ent, div, ce)

    (loss, (batch_stats, ent, div, ce)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    params, opt_state = self.apply_gradients(state, grads, ctx.tx)
    metrics = {"train/loss": loss, "train/ent": ent, "train/div": div, "train/pseudo_ce": ce,
               # monitoring only: the true labels never reach a loss
               "train/pseudo_acc": jnp.mean(pseudo == batch["label"])}
    return (state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state), metrics)

  def refresh_due(self, it_index):
    # No pseudo-label pass without the pseudo-label term (the authors' `cls_par > 0`).
    return bool(self.cls_par) and super().refresh_due(it_index)

  def refresh(self, state, target_list, refresh_index, ctx, *, with_teacher, resident=None):
    del with_teacher
    n = len(target_list)
    feats = probs = None
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    for b, images in ctx.batches(target_list, self.refresh_view, refresh_index, resident,
                                 "pseudo-labels"):
      feat, logits = ctx.evaluator.features(variables, images)
      if feats is None:
        feats = jnp.zeros((n, feat.shape[-1]), jnp.float32)
        probs = jnp.zeros((n, logits.shape[-1]), jnp.float32)
      idx = jnp.where(b["valid"], b["index"], n)      # padding rows dropped by the scatter
      feats = feats.at[idx].set(feat, mode="drop")
      probs = probs.at[idx].set(jax.nn.softmax(logits, -1), mode="drop")
    labels = obtain_label(feats, probs, threshold=self.threshold, num_images=n)
    truth = jnp.asarray(target_list.labels)          # monitoring only
    stats = {"refresh/argmax_acc": float(jnp.mean(jnp.argmax(probs, -1) == truth)),
             "refresh/cluster_acc": float(jnp.mean(labels == truth))}
    banks = jax.device_put(Banks(labels=labels), ctx.shardings.banks)
    return state.replace(banks=banks), stats
