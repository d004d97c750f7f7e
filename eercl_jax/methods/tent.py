"""Tent (Wang et al., "Tent: fully test-time adaptation by entropy minimization", ICLR 2021):
minimise the entropy of the model's predictions on target batches, training only the affine
scale and bias of the normalisation layers.

As the authors' `tent.py`: one train-mode forward per step on the un-augmented image (this
project's test view), loss = mean over the batch of -sum_c softmax(z)_c log_softmax(z)_c, the
gradient reaching only the normalisation layers' scale and bias. The authors adapt only
BatchNorm2d layers: here the backbone's normalisation layers - every BN of the ResNet, every
LayerNorm of the ViT, whose backbone has no BN (so that Tent adapts something there); the head's
BN layers (the authors' BatchNorm1d, which Tent leaves frozen) stay frozen but run in train mode,
as theirs. The authors' Adam (lr 1e-3, no weight decay) is the `method=tent` recipe of
configs/adapt.py. Where this differs from the authors' online protocol (they score each batch
with the logits of its own forward, BN normalising with the batch's statistics; here the loop
evaluates the whole target list with running statistics, as for every method):
docs/deviations.md#tent.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from eercl_jax.methods import base
from eercl_jax.models import eercl, layers


class Method(base.Method):
  name = "tent"
  paper = "Wang et al., Tent: fully test-time adaptation by entropy minimization (ICLR 2021)"
  views = ("test",)

  def trainable(self, params):
    return eercl.norm_affine_mask(params, scope="backbone")

  def step(self, state, batch, ctx):
    x = ctx.norm(batch["image"])
    groups = layers.num_groups(x.shape[0], ctx.bn_group_size)
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      _, logits, batch_stats = base.forward(ctx.model, params, state.batch_stats, x,
                                            groups=groups, rng=rng)
      p, logp = jax.nn.softmax(logits, -1), jax.nn.log_softmax(logits, -1)
      return jnp.mean(-jnp.sum(p * logp, -1)), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = self.apply_gradients(state, grads, ctx.tx)
    return (state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state),
            {"train/loss": loss})
