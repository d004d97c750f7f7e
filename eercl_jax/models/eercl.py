"""The EERCL network: backbone + the original's feature head + weight-normalised classifier.

Two head stacks, as the original (docs/method.md#model-backbones-and-head-stacks); the backbone's
registry entry (`models/registry.py`) says which one it gets:
  deep head:  backbone -> bottleneck (Dense, BN, ReLU, Dropout) -> mlp (Dense, ReLU, Dropout)
              -> sfda_bottleneck (Dense) -> sfda_bn -> feature f -> classifier     (ViT)
  plain head: backbone -> sfda_bottleneck (Dense) -> sfda_bn -> feature f -> classifier (ResNet)
The feature f (the BN output, no ReLU) feeds the classifier, the banks and the clustering.
The head runs in float32 whatever the backbone's compute dtype: it is ~0.1% of the FLOPs and its
output is what the banks store.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax.errors import ConfigError
from eercl_jax.models import registry
from eercl_jax.models.layers import GroupedBatchNorm, WeightNormDense

# Top-level parameter scope -> optimiser group (learning-rate multipliers: `registry`).
PARAM_GROUPS = {
    "backbone": "backbone",
    "bottleneck": "bottleneck",
    "bottleneck_bn": "bottleneck",
    "mlp": "mlp",
    "sfda_bottleneck": "sfda",
    "sfda_bn": "sfda",
    "classifier": "classifier",
}

# PyTorch's xavier_normal_ is an untruncated normal (jax's glorot_normal truncates).
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EERCLModel(nn.Module):
  backbone: str                 # a `registry.BACKBONES` name: 'vit' | 'resnet'
  size: Optional[str] = None    # the backbone's named size; None = its default
  num_classes: int = 7
  bottleneck_dim: int = 1024    # deep head only
  width: int = 1024             # deep head only
  feat_dim: int = 256
  dropout: float = 0.5
  dtype: Any = jnp.float32      # backbone compute dtype; params and head stay float32
  remat: bool = False           # rematerialise backbone blocks (memory for compute)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bn_groups: int = 1,
               use_dropout: Optional[bool] = None) -> tuple[jax.Array, jax.Array]:
    """x: normalised NHWC images. Returns (features (N, feat_dim), logits (N, C)), float32.

    In train mode every BN normalises over `bn_groups` fixed groups of rows and dropout draws
    from the 'dropout' rng; in eval mode BN uses running statistics and dropout is off.
    `use_dropout` overrides the dropout's mode (AdaBN: batch statistics without dropout).
    """
    no_dropout = not train if use_dropout is None else not use_dropout
    entry = registry.get(self.backbone)
    size = entry.default_size if self.size is None else self.size
    bn = lambda name, y: GroupedBatchNorm(name=name)(y, train=train, groups=bn_groups)
    body = entry.build(size, dtype=self.dtype, remat=self.remat, name="backbone")
    h = body(x, train=train, groups=bn_groups).astype(jnp.float32)
    if entry.deep_head:
      h = nn.Dense(self.bottleneck_dim, kernel_init=nn.initializers.normal(0.005),
                   bias_init=nn.initializers.constant(0.1), name="bottleneck")(h)
      h = nn.relu(bn("bottleneck_bn", h))
      h = nn.Dropout(self.dropout)(h, deterministic=no_dropout)
      h = nn.Dense(self.width, kernel_init=nn.initializers.normal(0.01),
                   bias_init=nn.initializers.zeros, name="mlp")(h)
      h = nn.relu(h)
      h = nn.Dropout(self.dropout)(h, deterministic=no_dropout)
    h = nn.Dense(self.feat_dim, kernel_init=_xavier_normal, bias_init=nn.initializers.zeros,
                 name="sfda_bottleneck")(h)
    features = bn("sfda_bn", h)
    logits = WeightNormDense(self.num_classes, name="classifier")(features)
    return features, logits


def param_groups(params) -> Any:
  """Same-structure pytree of group labels ('backbone', 'bottleneck', 'mlp', 'sfda',
  'classifier') for `optax.multi_transform`."""
  def label(path, _):
    top = getattr(path[0], "key", None)
    if top not in PARAM_GROUPS:
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no optimiser group "
                       f"(known top-level scopes: {sorted(PARAM_GROUPS)})")
    return PARAM_GROUPS[top]
  return jax.tree_util.tree_map_with_path(label, params)


def norm_affine_mask(params, scope: str | None = None) -> Any:
  """A bool pytree over `params`: True for the scale and bias of normalisation layers (the
  modules whose parameters are exactly {scale, bias}: batch norm and layer norm), inside the
  top-level `scope` when given."""
  def mark(tree, inside):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      is_norm = set(tree.keys()) == {"scale", "bias"}
      return {k: (jax.tree_util.tree_map(lambda _: inside, v) if is_norm else mark(v, inside))
              for k, v in tree.items()}
    return False
  return {k: mark(v, scope is None or k == scope) for k, v in params.items()}


def class_directions(params) -> jax.Array:
  """(C, D): the weight-norm direction parameters v of the classifier (one row per class)."""
  return params["classifier"]["v"]


def check_model_config(model_config) -> None:
  """The one check of the model fields: an unknown backbone, size or dtype is a ConfigError
  naming the key (a size left None is the backbone's default - or, in an adaptation config,
  the source checkpoint's: config_defaults.FROM_SOURCE)."""
  if model_config.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype: {model_config.dtype!r}: expected one of "
                      f"{sorted(DTYPES)}")
  try:
    entry = registry.get(model_config.backbone)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    entry.parse_size(registry.size_of(model_config))
  except ValueError as e:
    raise ConfigError(f"config.model.size: {e}") from None


def create_model(model_config) -> EERCLModel:
  """EERCLModel from a `config.model` ConfigDict (see config_defaults), checked by
  `check_model_config`."""
  check_model_config(model_config)
  size = registry.size_of(model_config)
  return EERCLModel(
      backbone=model_config.backbone,
      size=size,
      num_classes=model_config.num_classes,
      bottleneck_dim=model_config.bottleneck_dim,
      width=model_config.width,
      feat_dim=model_config.feat_dim,
      dropout=model_config.dropout,
      dtype=DTYPES[model_config.dtype],
      remat=bool(model_config.get("remat", False)))   # absent from configs of older checkpoints


def init_variables(model: EERCLModel, rng: jax.Array, image_size, batch: int = 2) -> dict:
  """{'params', 'batch_stats'} for `image_size` (int or (H, W)) images, initialised under jit."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(rng, jnp.zeros((batch, h, w, 3), jnp.float32))
  return dict(variables)


def variable_shapes(model: EERCLModel, image_size) -> dict:
  """{'params', 'batch_stats'} as `jax.ShapeDtypeStruct`s, without allocating any array."""
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), image_size))
  return {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s)."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
