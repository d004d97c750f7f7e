"""Optimiser and learning-rate schedules of the original (SGD + InvLR / constant), in optax.

PyTorch's SGD with coupled weight decay and Nesterov momentum,
  d = g + wd*p; buf = m*buf + d; d = d + m*buf; p -= lr*d,
is `add_decayed_weights(wd)` followed by optax's nesterov `sgd`; each parameter group (see
`models.eercl.param_groups`; multipliers per group: `models.registry`) gets its own chain whose
learning rate is the schedule times the group's multiplier. Frozen groups get no update and no weight decay, as parameters without
gradients in PyTorch.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

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
                   lr_mult: Mapping[str, float] | None = None,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """`labels(params)` maps every parameter to its group name; `lr_mult[group]` (default
  `optim.lr_mult`, already resolved to numbers) scales the schedule for that group. Groups named
  in `frozen` get neither updates nor weight decay; naming a group that does not exist is an
  error (a misspelt name would leave the group trainable)."""
  schedule = make_schedule(optim)
  lr_mult = dict(optim.lr_mult if lr_mult is None else lr_mult)
  group_names = sorted(lr_mult.keys())
  unknown_frozen = sorted(set(frozen) - set(group_names))
  if unknown_frozen:
    raise ValueError(f"frozen parameter group(s) {unknown_frozen} do not exist; the groups are "
                     f"{group_names}")
  transforms = {}
  for name in group_names:
    if name in frozen:
      transforms[name] = optax.set_to_zero()
      continue
    if lr_mult[name] is None:
      raise ValueError(f"config.optim.lr_mult.{name} is unresolved (None): pass the backbone's "
                       "multipliers (models.registry.lr_mult)")
    mult = float(lr_mult[name])
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


def for_model(config, frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """The run's optimiser: the config's schedule, the backbone's group multipliers unless the
  config sets them, the EERCL model's parameter groups."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import eercl, registry
  return make_optimizer(config.optim, eercl.param_groups,
                        registry.lr_mult(config.model, config.optim), frozen=frozen)
