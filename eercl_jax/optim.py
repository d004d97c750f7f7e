"""Optimisers and learning-rate schedules of the original and of the baseline methods, in optax.

PyTorch's SGD with coupled weight decay and Nesterov momentum,
  d = g + wd*p; buf = m*buf + d; d = d + m*buf; p -= lr*d,
is `add_decayed_weights(wd)` followed by optax's nesterov `sgd`; PyTorch's Adam with its (coupled)
weight decay is `add_decayed_weights(wd)` followed by optax's `adam` (Tent's optimiser). Each
parameter group (see `models.eercl.param_groups`; multipliers per group: `models.registry`) gets
its own chain whose learning rate is the schedule times the group's multiplier. Frozen groups,
and parameters a method does not train, get no update and no weight decay, as parameters without
gradients in PyTorch.

Schedules (`config.optim.schedule`, t = the 0-based optimiser step, T = config.num_steps):
  constant   lr
  inv        lr * (1 + gamma t)^-power                 (the original's InvLR)
  shot       lr * (1 + gamma (t + 1) / T)^-power       (SHOT's lr_scheduler, also NRC's and
                                                        AaD's: their first step counts 1)
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from eercl_jax.errors import ConfigError

# The label of the parameters a method does not train.
_UNTRAINED = "untrained"


def inv_lr_factor(step, gamma: float, power: float):
  """basicda's InvLR: lr(t) = base_lr * (1 + gamma*t)^(-power), t = 0-based optimiser step."""
  return (1.0 + gamma * jnp.asarray(step, jnp.float32)) ** (-power)


SCHEDULES = ("constant", "inv", "shot")
OPTIMIZERS = ("sgd", "adam")


def make_schedule(optim: ml_collections.ConfigDict, num_steps: int = 1) -> optax.Schedule:
  if optim.schedule == "inv":
    return lambda step: optim.lr * inv_lr_factor(step, optim.gamma, optim.power)
  if optim.schedule == "constant":
    return lambda step: jnp.asarray(optim.lr, jnp.float32) + 0.0 * step
  if optim.schedule == "shot":
    return lambda step: optim.lr * inv_lr_factor(jnp.asarray(step, jnp.float32) + 1.0,
                                                 optim.gamma / num_steps, optim.power)
  raise ConfigError(f"config.optim.schedule: unknown schedule {optim.schedule!r} "
                    f"(expected one of {', '.join(SCHEDULES)})")


def make_optimizer(optim: ml_collections.ConfigDict, labels: Callable,
                   lr_mult: Mapping[str, float] | None = None,
                   frozen: Sequence[str] = (), trainable: Callable | None = None,
                   num_steps: int = 1) -> optax.GradientTransformation:
  """`labels(params)` maps every parameter to its group name; `lr_mult[group]` (default
  `optim.lr_mult`, already resolved to numbers) scales the schedule for that group. Groups named
  in `frozen`, and parameters where `trainable(params)` (a bool pytree) is False, get neither
  updates nor weight decay; naming a group that does not exist is an error (a misspelt name
  would leave the group trainable)."""
  schedule = make_schedule(optim, num_steps)
  name = optim.get("name", "sgd")   # absent from configs of older checkpoints
  if name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name: {name!r}: expected one of {', '.join(OPTIMIZERS)}")
  lr_mult = dict(optim.lr_mult if lr_mult is None else lr_mult)
  group_names = sorted(lr_mult.keys())
  unknown_frozen = sorted(set(frozen) - set(group_names))
  if unknown_frozen:
    raise ValueError(f"frozen parameter group(s) {unknown_frozen} do not exist; the groups are "
                     f"{group_names}")
  transforms = {}
  for group in group_names:
    if group in frozen:
      transforms[group] = optax.set_to_zero()
      continue
    if lr_mult[group] is None:
      raise ValueError(f"config.optim.lr_mult.{group} is unresolved (None): pass the backbone's "
                       "multipliers (models.registry.lr_mult)")
    rate = lambda step, mult=float(lr_mult[group]): schedule(step) * mult
    if name == "adam":
      step_rule = optax.adam(rate, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    else:
      step_rule = optax.sgd(rate, momentum=optim.momentum, nesterov=optim.nesterov)
    transforms[group] = optax.chain(optax.add_decayed_weights(optim.weight_decay), step_rule)
  transforms[_UNTRAINED] = optax.set_to_zero()

  def checked_labels(params):
    tree = labels(params)
    unknown = set(jax.tree_util.tree_leaves(tree)) - set(group_names)
    if unknown:
      raise ValueError(f"config.optim.lr_mult has no entry for parameter group(s) {sorted(unknown)}; "
                       f"it has {group_names}")
    mask = trainable(params) if trainable is not None else None
    if mask is not None:
      tree = jax.tree_util.tree_map(lambda group, train: group if train else _UNTRAINED, tree,
                                    mask)
    return tree

  return optax.multi_transform(transforms, checked_labels)


def for_model(config, frozen: Sequence[str] = (),
              trainable: Callable | None = None) -> optax.GradientTransformation:
  """The run's optimiser: the config's schedule, the backbone's group multipliers unless the
  config sets them, the EERCL model's parameter groups."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import eercl, registry
  return make_optimizer(config.optim, eercl.param_groups,
                        registry.lr_mult(config.model, config.optim), frozen=frozen,
                        trainable=trainable, num_steps=config.num_steps)
