"""Layers with PyTorch semantics that Flax does not provide as-is.

* `GroupedBatchNorm`: batch norm whose batch statistics come from fixed groups of rows ("ghost
  BN"). The original ran plain per-GPU BN on 2 GPUs x 32 images; fixing the groups in the model
  instead of in the hardware makes results independent of how many devices run a step
  (docs/deviations.md#grouped-batch-norm-instead-of-per-gpu-bn).
* `WeightNormDense`: `torch.nn.utils.weight_norm(nn.Linear(D, C), dim=0)` with the effective
  initialisation of the original (docs/method.md#classifier-and-its-initialisation).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.1    # PyTorch: running = (1 - 0.1) * running + 0.1 * batch
BN_EPSILON = 1e-5    # PyTorch BatchNorm1d/2d default (torchvision ResNet keeps it)


def num_groups(rows: int, group_size: int) -> int:
  """How many BN groups of `group_size` rows a batch of `rows` makes (must divide exactly)."""
  if group_size < 1 or rows % group_size:
    raise ValueError(f"a batch of {rows} images cannot be split into BN groups of "
                     f"config.bn_group_size={group_size}")
  return rows // group_size


class GroupedBatchNorm(nn.Module):
  """BatchNorm over the last axis with statistics per fixed group of rows.

  `x` is (N, ..., F); group g is rows [g*N/groups, (g+1)*N/groups). In training each group is
  normalised with its own mean and biased variance over its rows and all middle axes, as one GPU's
  BN in the original. The running statistics follow PyTorch (biased variance normalises, unbiased
  variance updates the running var); with several groups the update uses the mean over groups of
  the groups' mean and unbiased variance - what the original's running stats on GPU 0 track in
  expectation, and deterministic here. Statistics are computed in float32 whatever the input
  dtype; the output has the input's dtype.
  """
  epsilon: float = BN_EPSILON
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: int = 1) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    xf = x.astype(jnp.float32)
    if not train:
      y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return (y * scale + bias).astype(x.dtype)

    n = x.shape[0]
    if groups < 1 or n % groups:
      raise ValueError(f"GroupedBatchNorm: batch of {n} rows cannot be split into {groups} "
                       "equal groups")
    rows = n // groups
    middle = tuple(range(1, x.ndim - 1))        # spatial axes, if any
    count = rows * math.prod(x.shape[1:-1])     # values per feature per group
    # Group sums go through an (N x groups) membership matrix rather than a reshape to
    # (groups, rows, ...): a batch sharded over an explicit mesh cannot be reshaped that way,
    # while these contractions work for any sharding. HIGHEST keeps GPUs from using TF32.
    member = (jnp.arange(n)[:, None] // rows == jnp.arange(groups)[None, :]).astype(jnp.float32)
    to_groups = lambda v: jnp.einsum("ng,nf->gf", member, v, precision="highest")
    to_rows = lambda v: jnp.einsum("ng,gf->nf", member, v,
                                   precision="highest")[(slice(None),) + (None,) * len(middle)]
    row_sum = lambda v: jnp.sum(v, axis=middle) if middle else v

    mean = to_groups(row_sum(xf)) / count
    centered = xf - to_rows(mean)
    # Two-pass variance: E[x^2] - E[x]^2 loses precision in float32 for large activations.
    var = to_groups(row_sum(jnp.square(centered))) / count
    y = centered * to_rows(jax.lax.rsqrt(var + self.epsilon)) * scale + bias

    if not self.is_initializing():
      unbiased = var * (count / max(count - 1, 1))
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean, axis=0)
      ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(unbiased, axis=0)
    return y.astype(x.dtype)


class WeightNormDense(nn.Module):
  """`weight_norm(Linear(D, C), dim=0)`: row c of the weight is g_c * v_c / ||v_c||.

  `v` is stored (C, D) like PyTorch's `weight_v`, so `params['v']` is the per-class direction
  matrix the method uses. Init is what the original effectively gets (its Xavier call hits a
  recomputed tensor and is lost): `v` PyTorch's default Linear init U(-1/sqrt(D), 1/sqrt(D)),
  `g = ||v||` (so the initial weight equals `v`), bias 0. Computed in float32.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    bound = 1.0 / math.sqrt(d)
    v = self.param("v", lambda key, shape: jax.random.uniform(
        key, shape, jnp.float32, -bound, bound), (self.features, d))
    # g's initial value depends on v's; v is already created when this init runs.
    g = self.param("g", lambda key: jnp.linalg.norm(v, axis=1))
    b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
    # No epsilon in the norm, as PyTorch's weight_norm.
    w = v * (g / jnp.linalg.norm(v, axis=1))[:, None]
    return x.astype(jnp.float32) @ w.T + b
