"""AaD (Yang et al., "Attracting and dispersing: a simple approach for source-free domain
adaptation", NeurIPS 2022), as its authors' `tar_adaptation.py`.

Per step, one train-mode forward of the weak view: the batch's L2-normalised features and
probabilities overwrite their rows of the banks (feature_banks.py), each image's K nearest bank
rows (the top K+1 by cosine, the first - itself - dropped) give their scores s, and

    loss = attract + alpha x disperse,
    attract  = (1/B) sum_i sum_k sum_c s_ikc (log s_ikc - p_ic)   (kl_div with probabilities)
    disperse = (1/B) sum_i sum_{j != i} <p_i, p_j>                (both factors carry gradient)
    alpha    = (1 + 10 t / T)^-beta,  t the 0-based step, T = num_steps

- `losses.aad_loss`, the same loss EERCL's AaD term computes on its teacher's bank. Defaults
(the authors' VisDA script): K 5, beta 5, the classifier trained; the optimiser of the
`method=aad` recipe of configs/adapt.py (SGD, Nesterov, momentum 0.9, coupled weight decay 1e-3,
lr 1e-3 with lr x (1 + 10 p)^-0.75, the backbone at 0.1x).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from eercl_jax import banks as bank_lib
from eercl_jax import losses
from eercl_jax.methods import base, feature_banks
from eercl_jax.models import layers


def alpha(step, num_steps: int, beta: float, scale: float = 1.0):
  """The dispersion weight (1 + 10 step / num_steps)^-beta x scale (step 0-based, as the
  authors', who take it before incrementing their iteration count)."""
  return (1.0 + 10.0 * step / num_steps) ** (-beta) * scale


class Method(base.Method):
  name = "aad"
  refresh_name = "bank fill"
  paper = ("Yang et al., Attracting and dispersing: a simple approach for source-free domain "
           "adaptation (NeurIPS 2022)")
  log_keys = (("train/loss", "loss", ".4f"), ("train/aad_attract", "aad_attract", ".4f"),
              ("train/aad_disperse", "aad_disperse", ".4f"), ("train/alpha", "alpha", ".3f"))

  def __init__(self, config):
    super().__init__(config)
    s = config.aad
    self.k, self.beta, self.alpha_scale = s.k, s.beta, s.alpha
    self.refresh_view = s.view
    self.feat_dim, self.num_classes = config.model.feat_dim, config.model.num_classes

  def init_banks(self, rng, num_images, params, mesh):
    return feature_banks.init(num_images, self.feat_dim, self.num_classes)

  def step(self, state, batch, ctx):
    x = ctx.norm(batch["image"])
    groups = layers.num_groups(x.shape[0], ctx.bn_group_size)
    rng = jax.random.fold_in(state.rng, state.step)
    a = alpha(state.step, ctx.num_steps, self.beta, self.alpha_scale)

    def loss_fn(params):
      feat, logits, batch_stats = base.forward(ctx.model, params, state.batch_stats, x,
                                               groups=groups, rng=rng)
      probs = jax.nn.softmax(logits, -1)
      banks = feature_banks.update(state.banks, batch["index"], feat, probs)
      query = banks.feat[batch["index"]]
      neighbours = bank_lib.aad_neighbour_probs(query, banks.feat, banks.score, self.k)
      attract, disperse = losses.aad_loss(probs, neighbours)
      return attract + a * disperse, (batch_stats, banks, attract, disperse)

    (loss, (batch_stats, banks, attract, disperse)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    params, opt_state = self.apply_gradients(state, grads, ctx.tx)
    metrics = {"train/loss": loss, "train/aad_attract": attract, "train/aad_disperse": disperse,
               "train/alpha": jnp.asarray(a, jnp.float32)}
    return (state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state, banks=banks), metrics)

  def refresh(self, state, target_list, refresh_index, ctx, *, with_teacher, resident=None):
    del with_teacher
    return feature_banks.fill(self, state, target_list, refresh_index, ctx, resident)
