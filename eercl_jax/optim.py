"""Optimiser and learning-rate schedules of the original (SGD + InvLR / constant), in optax.

PyTorch's SGD with coupled weight decay and Nesterov momentum,
  d = g + wd*p; buf = m*buf + d; d = d + m*buf; p -= lr*d,
is `add_decayed_weights(wd)` followed by optax's nesterov `sgd`; each parameter group (see
`models.eercl.param_groups`) gets its own chain whose learning rate is the schedule times the
group's multiplier. Frozen groups get no update and no weight decay, as parameters without
gradients in PyTorch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax


def inv_lr_factor(step, gamma: float, power: float):
  """basicda's InvLR: lr(t) = base_lr * (1 + gamma*t)^(-power), t = 0-based optimiser step."""
  return (1.0 + gamma * jnp.asarray(step, jnp.float32)) ** (-power)


def make_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  if optim.schedule == "inv":
    return lambda step: optim.lr * inv_lr_factor(step, optim.gamma, optim.power)
  if optim.schedule == "constant":
    return lambda step: jnp.asarray(optim.lr, jnp.float32) + 0.0 * step
  raise ValueError(f"config.optim.schedule: unknown schedule {optim.schedule!r} "
                   "(expected 'inv' or 'constant')")


def make_optimizer(optim: ml_collections.ConfigDict, labels: Callable,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """`labels(params)` maps every parameter to its group name; `optim.lr_mult[group]` scales it."""
  schedule = make_schedule(optim)
  group_names = sorted(optim.lr_mult.keys())
  transforms = {}
  for name in group_names:
    if name in frozen:
      transforms[name] = optax.set_to_zero()
      continue
    mult = float(optim.lr_mult[name])
    transforms[name] = optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(lambda step, mult=mult: schedule(step) * mult,
                  momentum=optim.momentum, nesterov=optim.nesterov))

  def checked_labels(params):
    tree = labels(params)
    unknown = set(jax.tree_util.tree_leaves(tree)) - set(group_names)
    if unknown:
      raise ValueError(f"config.optim.lr_mult has no entry for parameter group(s) {sorted(unknown)}; "
                       f"it has {group_names}")
    return tree

  return optax.multi_transform(transforms, checked_labels)
