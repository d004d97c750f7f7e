"""The EERCL network: backbone + the original's feature head + weight-normalised classifier.

Two heads, as the original (algorithm.md 1.2-1.4):
  ViT:       backbone -> bottleneck (Dense, BN, ReLU, Dropout) -> mlp (Dense, ReLU, Dropout)
             -> sfda_bottleneck (Dense) -> sfda_bn -> feature f -> classifier
  ResNet-50: backbone -> sfda_bottleneck (Dense) -> sfda_bn -> feature f -> classifier
The feature f (the BN output, no ReLU) feeds the classifier, the banks and the clustering.
The head runs in float32 whatever the backbone's compute dtype: it is ~0.1% of the FLOPs and its
output is what the banks store.

Learning-rate multipliers of the original, per group of `param_groups` (the training code reads
them from `config.optim.lr_mult`):
  ViT:    backbone 0.1, bottleneck 1, mlp 1, sfda 10, classifier 10
  ResNet: backbone 1,   sfda 10, classifier 10
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax.models.layers import GroupedBatchNorm, WeightNormDense
from eercl_jax.models.resnet import ResNet
from eercl_jax.models.vit import VisionTransformer

# Top-level parameter scope -> optimiser group label.
PARAM_GROUPS = {
    "backbone": "backbone",
    "bottleneck": "bottleneck",
    "bottleneck_bn": "bottleneck",
    "mlp": "mlp",
    "sfda_bottleneck": "sfda",
    "sfda_bn": "sfda",
    "classifier": "classifier",
}

# The original's multipliers (documentation and defaults; config_defaults carries the same).
ORIGINAL_LR_MULT = {
    "vit": {"backbone": 0.1, "bottleneck": 1.0, "mlp": 1.0, "sfda": 10.0, "classifier": 10.0},
    "resnet50": {"backbone": 1.0, "sfda": 10.0, "classifier": 10.0},
}

# PyTorch's xavier_normal_ is an untruncated normal (jax's glorot_normal truncates).
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EERCLModel(nn.Module):
  backbone: str                 # 'vit' | 'resnet50'
  vit_size: str = "B/16"
  num_classes: int = 7
  bottleneck_dim: int = 1024
  width: int = 1024
  feat_dim: int = 256
  dropout: float = 0.5
  dtype: Any = jnp.float32      # backbone compute dtype; params and head stay float32
  remat: bool = False           # rematerialise ViT blocks (memory for compute)
  resnet_stages: tuple = (3, 4, 6, 3)   # smaller values only for tests
  resnet_width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               bn_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """x: normalised NHWC images. Returns (features (N, feat_dim), logits (N, C)), float32.

    In train mode every BN normalises over `bn_groups` fixed groups of rows and dropout draws
    from the 'dropout' rng; in eval mode BN uses running statistics and dropout is off.
    """
    bn = lambda name, y: GroupedBatchNorm(name=name)(y, train=train, groups=bn_groups)
    if self.backbone == "vit":
      h = VisionTransformer.from_size(self.vit_size, dtype=self.dtype, remat=self.remat,
                                      name="backbone")(x, train=train)
      h = h.astype(jnp.float32)
      h = nn.Dense(self.bottleneck_dim, kernel_init=nn.initializers.normal(0.005),
                   bias_init=nn.initializers.constant(0.1), name="bottleneck")(h)
      h = nn.relu(bn("bottleneck_bn", h))
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
      h = nn.Dense(self.width, kernel_init=nn.initializers.normal(0.01),
                   bias_init=nn.initializers.zeros, name="mlp")(h)
      h = nn.relu(h)
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    elif self.backbone == "resnet50":
      h = ResNet(stage_sizes=tuple(self.resnet_stages), base_width=self.resnet_width,
                 dtype=self.dtype, name="backbone")(x, train=train, groups=bn_groups)
    else:
      raise ValueError(f"unknown backbone {self.backbone!r} (expected 'vit' or 'resnet50')")
    h = nn.Dense(self.feat_dim, kernel_init=_xavier_normal, bias_init=nn.initializers.zeros,
                 name="sfda_bottleneck")(h.astype(jnp.float32))
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


def class_directions(params) -> jax.Array:
  """(C, D): the weight-norm direction parameters v of the classifier (one row per class)."""
  return params["classifier"]["v"]


def create_model(model_config) -> EERCLModel:
  """EERCLModel from a `config.model` ConfigDict (see config_defaults._model)."""
  if model_config.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r}: expected one of "
                     f"{sorted(_DTYPES)}")
  return EERCLModel(
      backbone=model_config.backbone,
      vit_size=model_config.vit_size,
      num_classes=model_config.num_classes,
      bottleneck_dim=model_config.bottleneck_dim,
      width=model_config.width,
      feat_dim=model_config.feat_dim,
      dropout=model_config.dropout,
      dtype=_DTYPES[model_config.dtype],
      remat=bool(model_config.get("remat", False)))


def init_variables(model: EERCLModel, rng: jax.Array, image_size, batch: int = 2) -> dict:
  """{'params', 'batch_stats'} for `image_size` (int or (H, W)) images, initialised under jit."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(rng, jnp.zeros((batch, h, w, 3), jnp.float32))
  return dict(variables)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s)."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
