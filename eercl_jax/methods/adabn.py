"""AdaBN (Li et al., "Revisiting batch normalization for practical domain adaptation", 2016):
the source model with every batch-norm layer's statistics re-estimated on the target, no
gradient.

The usual PyTorch recipe, which this follows: reset each BN layer's running statistics, set its
momentum to None (a cumulative average), run one pass over the target list with the layers in
train mode and dropout off, then evaluate with the new statistics. After the pass each running
mean is the average over batches of the batches' means and each running variance the average of
their unbiased variances, every batch weighing the same (the last, smaller one included). The
pass runs before the first step; the steps leave the model as it is. On the ViT only the head has
BN layers (its backbone normalises with LayerNorm, which keeps no statistics), so only the head's
statistics change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax.methods import base
from eercl_jax.models import layers


class Method(base.Method):
  name = "adabn"
  refresh_name = "BN statistics"
  paper = "Li et al., Revisiting batch normalization for practical domain adaptation (2016)"

  def __init__(self, config):
    super().__init__(config)
    self.refresh_view = config.adabn.view
    self.batch_size = config.adabn.batch_size

  def step(self, state, batch, ctx):
    del batch, ctx
    return state.replace(step=state.step + 1), {"train/loss": jnp.zeros((), jnp.float32)}

  def refresh(self, state, target_list, refresh_index, ctx, *, with_teacher, resident=None):
    del with_teacher, resident
    model, norm = ctx.evaluator.model, ctx.evaluator.norm
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.batch_stats)

    @jax.jit
    def scaled_stats(params, images):
      # From zero running statistics one train-mode update leaves momentum x the batch's mean
      # and unbiased variance (layers.GroupedBatchNorm): the batch's own statistics, scaled.
      _, _, new = base.forward(model, params, zeros, norm(images), groups=1,
                               rng=jax.random.PRNGKey(0), train=True, use_dropout=False)
      return new

    total, count = None, 0
    for host in ctx.evaluator.loader.eval(target_list, self.refresh_view, self.batch_size,
                                          seed=ctx.seed, epoch=refresh_index):
      images = np.asarray(host["image"])[np.asarray(host["valid"])]
      if not len(images):
        continue
      stats = scaled_stats(state.params, images)
      total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
      count += 1
    if jax.process_count() > 1:   # every process saw its own rows: average over all of them
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      total = jax.tree_util.tree_map(
          lambda x: jnp.sum(multihost_utils.process_allgather(x), 0), total)
      count = int(np.sum(multihost_utils.process_allgather(np.int32(count))))
    batch_stats = jax.tree_util.tree_map(lambda t: t / (count * layers.BN_MOMENTUM), total)
    batch_stats = jax.device_put(batch_stats, ctx.shardings.batch_stats)
    return state.replace(batch_stats=batch_stats), {"refresh/batches": float(count)}
