"""NRC (Yang et al., "Exploiting the intrinsic neighborhood structure for source-free domain
adaptation", NeurIPS 2021), as its authors' `train_tar.py`.

Per step, one train-mode forward of the weak view: the batch's L2-normalised features and
probabilities overwrite their rows of the banks (feature_banks.py); each image's K nearest bank
rows (the top K+1 by cosine, itself dropped) are its neighbours, each neighbour's KK nearest
rows (its own top KK+1, itself dropped) the expanded neighbours. A neighbour whose expanded
neighbours hold the image (a reciprocal neighbour) weighs 1, any other `affinity` (r = 0.1);
every expanded neighbour weighs 0.1 (the image itself may be among them: the authors' implicit
self-regularisation). With s a bank row's scores and p the image's prediction,

    loss = (1/B) sum_i sum_expanded 0.1 KL(s, p) + (1/B) sum_i sum_k w_ik KL(s_k, p)
           + sum_c m_c log(m_c + eps),   m = mean_i p_i  (the diversity term)

where KL(s, p) = sum_c s_c (log s_c - p_c): torch's kl_div given probabilities, as the authors'.
Defaults (the authors' VisDA script): K 5, KK 5, eps 1e-5, the classifier trained; the optimiser
of the `method=nrc` recipe of configs/adapt.py (SGD, Nesterov, momentum 0.9, coupled weight
decay 1e-3, lr 1e-3 with lr x (1 + 10 p)^-0.75, the backbone at 0.1x). The reciprocal weight is
the paper's and the authors' Office-Home script's: their VisDA script fills it with 0.1 through
a view (docs/deviations.md#nrc).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from eercl_jax import losses
from eercl_jax.methods import base, feature_banks
from eercl_jax.models import layers

HIGHEST = losses.HIGHEST


def _kl(scores, probs):
  """sum_c s (log s - p) per neighbour: (B, n, C), (B, C) -> (B, n); 0 log 0 = 0."""
  return jnp.sum(jax.scipy.special.xlogy(scores, scores) - scores * probs[:, None, :], -1)


def neighbourhood(query, idx, feat_bank, score_bank, k: int, kk: int, affinity: float):
  """(neighbour scores (B, K, C), their weights (B, K), expanded scores (B, K*KK, C)) of the
  queries `query` (the batch's rows `idx` of the bank, already written)."""
  sims = jnp.matmul(query, feat_bank.T, precision=HIGHEST)
  _, nn = jax.lax.top_k(sims, k + 1)
  nn = jax.lax.optimization_barrier(nn[:, 1:])                     # (B, K), self dropped
  near = jnp.take(feat_bank, nn, axis=0)                           # (B, K, D)
  _, nnn = jax.lax.top_k(jnp.matmul(near, feat_bank.T, precision=HIGHEST), kk + 1)
  nnn = jax.lax.optimization_barrier(nnn[..., 1:])                 # (B, K, KK)
  match = jnp.sum(nnn == idx[:, None, None], -1).astype(jnp.float32)
  weight = jnp.where(match > 0, match, affinity)
  expanded = jnp.take(score_bank, nnn.reshape(nnn.shape[0], -1), axis=0)
  return jnp.take(score_bank, nn, axis=0), weight, expanded


class Method(base.Method):
  name = "nrc"
  refresh_name = "bank fill"
  paper = ("Yang et al., Exploiting the intrinsic neighborhood structure for source-free "
           "domain adaptation (NeurIPS 2021)")
  log_keys = (("train/loss", "loss", ".4f"), ("train/nrc_neighbours", "neighbours", ".4f"),
              ("train/nrc_expanded", "expanded", ".4f"), ("train/nrc_diversity", "div", ".4f"),
              ("train/reciprocal", "reciprocal", ".3f"))

  def __init__(self, config):
    super().__init__(config)
    s = config.nrc
    self.k, self.kk, self.affinity = s.k, s.kk, s.affinity
    self.expanded_weight, self.epsilon = s.expanded_weight, s.epsilon
    self.refresh_view = s.view
    self.feat_dim, self.num_classes = config.model.feat_dim, config.model.num_classes

  def init_banks(self, rng, num_images, params, mesh):
    return feature_banks.init(num_images, self.feat_dim, self.num_classes)

  def step(self, state, batch, ctx):
    x = ctx.norm(batch["image"])
    groups = layers.num_groups(x.shape[0], ctx.bn_group_size)
    rng = jax.random.fold_in(state.rng, state.step)
    idx = batch["index"]

    def loss_fn(params):
      feat, logits, batch_stats = base.forward(ctx.model, params, state.batch_stats, x,
                                               groups=groups, rng=rng)
      probs = jax.nn.softmax(logits, -1)
      banks = feature_banks.update(state.banks, idx, feat, probs)
      s_nn, weight, s_kk = jax.lax.stop_gradient(neighbourhood(
          banks.feat[idx], idx, banks.feat, banks.score, self.k, self.kk, self.affinity))
      near = jnp.mean(jnp.sum(weight * _kl(s_nn, probs), -1))
      expanded = jnp.mean(jnp.sum(self.expanded_weight * _kl(s_kk, probs), -1))
      m = jnp.mean(probs, 0)
      diversity = jnp.sum(m * jnp.log(m + self.epsilon))
      loss = expanded + near + diversity
      return loss, (batch_stats, banks, near, expanded, diversity, jnp.mean(weight == 1.0))

    (loss, (batch_stats, banks, near, expanded, diversity, reciprocal)), grads = \
        jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = self.apply_gradients(state, grads, ctx.tx)
    metrics = {"train/loss": loss, "train/nrc_neighbours": near, "train/nrc_expanded": expanded,
               "train/nrc_diversity": diversity, "train/reciprocal": reciprocal}
    return (state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state, banks=banks), metrics)

  def refresh(self, state, target_list, refresh_index, ctx, *, with_teacher, resident=None):
    del with_teacher
    return feature_banks.fill(self, state, target_list, refresh_index, ctx, resident)
