"""ResNet with bottleneck blocks in torchvision's layout (v1.5: the stride sits on the 3x3 conv).

NHWC. Module names mirror torchvision's state-dict keys so weights map by a fixed rule:
`conv1`, `bn1`, `layer{s}_{b}/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_conv,downsample_bn}`
(torchvision: `layer{s}.{b}.conv1.weight`, `layer{s}.{b}.downsample.0/1.*`). BN is
`GroupedBatchNorm` so the fixed BN groups apply to the backbone as well. The fc layer is dropped:
the output is the globally average-pooled feature (2048-d for ResNet-50).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from eercl_jax.models.layers import GroupedBatchNorm
from eercl_jax.weights import rules

# torchvision initialises convs with kaiming_normal(fan_out, relu) - untruncated normal.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

RESNET50_STAGES = (3, 4, 6, 3)

# Named sizes: blocks per stage and the first stage's width. 'mu' is a tiny net for tests.
SIZES = {
    "50": dict(stage_sizes=(3, 4, 6, 3), base_width=64),
    "101": dict(stage_sizes=(3, 4, 23, 3), base_width=64),
    "152": dict(stage_sizes=(3, 8, 36, 3), base_width=64),
    "26": dict(stage_sizes=(2, 2, 2, 2), base_width=64),
    "mu": dict(stage_sizes=(1, 1, 1, 1), base_width=8),
}


def parse_size(name: str) -> dict:
  if name not in SIZES:
    raise ValueError(f"unknown ResNet size {name!r}: expected one of {sorted(SIZES)}")
  return dict(SIZES[name])


class Bottleneck(nn.Module):
  width: int            # channels of the 1x1/3x3 convs; the block outputs 4*width
  stride: int = 1
  dtype: Any = jnp.float32
  train: bool = False   # fields, not call arguments, so nn.remat needs no static arguments
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    train, groups = self.train, self.groups
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), strides=(s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=_conv_init, dtype=self.dtype, name=name)
    bn = lambda name: (lambda y: GroupedBatchNorm(name=name)(y, train=train, groups=groups))

    out_features = 4 * self.width
    y = nn.relu(bn("bn1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
    y = bn("bn3")(conv(out_features, 1, 1, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = bn("downsample_bn")(conv(out_features, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Default fields give ResNet-50; e.g. `stage_sizes=(1,1,1,1), base_width=8` is a tiny test net
  (output 32*base_width features)."""
  stage_sizes: Sequence[int] = RESNET50_STAGES
  base_width: int = 64
  dtype: Any = jnp.float32
  remat: bool = False   # rematerialise blocks (memory for compute)

  @property
  def out_features(self) -> int:
    return self.base_width * 8 * 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: int = 1) -> jax.Array:
    x = nn.Conv(self.base_width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)],
                use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(GroupedBatchNorm(name="bn1")(x, train=train, groups=groups))
    # Padding with -inf (Flax's max_pool default), as PyTorch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        stride = 2 if s > 0 and b == 0 else 1
        x = block_cls(self.base_width * 2**s, stride, self.dtype, train=train, groups=groups,
                      name=f"layer{s + 1}_{b}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def build(size: str, dtype: Any = jnp.float32, remat: bool = False, **kwargs) -> ResNet:
  return ResNet(**parse_size(size), dtype=dtype, remat=remat, **kwargs)


# ----------------------------------------------------------------------------------------------
# Weight-file layout: torchvision's state-dict names

def _torch_module_name(name: str) -> str:
  m = re.fullmatch(r"layer(\d+)_(\d+)", name)
  if m:
    return f"layer{m.group(1)}.{m.group(2)}"
  return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)


def torchvision_rule(path, shape):
  """conv OIHW -> HWIO; BN weight/bias -> scale/bias, running_mean/var -> batch_stats."""
  del shape
  col, *mods, leaf = path
  module = ".".join(_torch_module_name(m) for m in mods)
  if leaf == "kernel":
    return (f"{module}.weight",) + rules.CONV_OIHW_TO_HWIO
  return rules.torch_bn_rule(col, module, leaf)


WEIGHT_FORMATS = {
    "torchvision_resnet": rules.WeightFormat("layer1.0.conv1.weight", torchvision_rule,
                                             ignored=("fc.",)),
}
