"""The backbone registry: everything the code needs to know about a backbone, in one entry.

An entry owns its constructor and named sizes (with a test-sized one), the head stack the
original put on it, the learning-rate multipliers of its parameter groups, the weight-file
layouts it loads (and the one it exports), where its weights sit in the original PyTorch
trainer's checkpoints, and which `config.model` fields a checkpoint must match.

Adding a backbone = a module with `build(size, dtype, remat)` and its `WEIGHT_FORMATS`, and one
`Backbone(...)` entry in `BACKBONES` below. The module returned by `build` is called as
`module(x, train=..., groups=...)` on normalised NHWC images and returns (N, features).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from eercl_jax.models import resnet, vit
from eercl_jax.weights.rules import WeightFormat

# Parameter groups of the EERCL model (see `eercl.PARAM_GROUPS`): backbone, bottleneck (the
# ViT head's first Dense + BN), mlp (the ViT head's second Dense), sfda (the feature bottleneck
# and its BN), classifier (the weight-normalised head).
GROUPS = ("backbone", "bottleneck", "mlp", "sfda", "classifier")


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str
  build: Callable[..., nn.Module]          # (size, dtype, remat, name=) -> flax module
  parse_size: Callable[[str], dict]        # named size -> constructor fields (raises on unknown)
  default_size: str
  test_size: str                           # smallest size, for tests and the demo
  # The original's head stack on this backbone: True = bottleneck Dense+BN+ReLU+Dropout and an
  # mlp Dense+ReLU+Dropout before the feature bottleneck (its ViT head); False = the feature
  # bottleneck directly (its ResNet head).
  deep_head: bool
  lr_mult: Mapping[str, float]             # per parameter group, relative to config.optim.lr
  weight_formats: Mapping[str, WeightFormat]   # layouts `config.model.init_from` may hold
  export_format: str                       # layout `tools/export_npz` writes
  # The original trainer's state dict: the backbone's key prefix, its layout there, the head
  # scopes' module names, and key aliases (prefix -> prefix) it also stores.
  original_prefix: str
  original_format: str
  original_head: Mapping[str, str]
  original_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # config.model fields a checkpoint's metadata must match to be restored into this model.
  arch_keys: tuple[str, ...] = ("backbone", "size", "num_classes", "feat_dim")


BACKBONES: dict[str, Backbone] = {
    "vit": Backbone(
        name="vit", build=vit.build, parse_size=vit.parse_vit_size,
        default_size="B/16", test_size="mu/8", deep_head=True,
        # Office-Home ViT recipe of the original: ViT body 0.1x, head 1x, sfda + classifier 10x.
        lr_mult={"backbone": 0.1, "bottleneck": 1.0, "mlp": 1.0, "sfda": 10.0,
                 "classifier": 10.0},
        weight_formats=vit.WEIGHT_FORMATS, export_format="jax_vit",
        original_prefix="online_network.base_network.", original_format="timm_vit",
        original_head={"bottleneck": "online_network.bottleneck.0",
                       "bottleneck_bn": "online_network.bottleneck.1",
                       "mlp": "online_network.classifier.0",
                       "sfda_bottleneck": "online_network.sfda_bottleneck",
                       "sfda_bn": "online_network.sfda_bn"},
        arch_keys=("backbone", "size", "num_classes", "bottleneck_dim", "width", "feat_dim")),
    "resnet": Backbone(
        name="resnet", build=resnet.build, parse_size=resnet.parse_size,
        default_size="50", test_size="mu", deep_head=False,
        # The original FER recipe: backbone 1x, bottleneck + BN 10x, classifier 10x.
        lr_mult={"backbone": 1.0, "bottleneck": 1.0, "mlp": 1.0, "sfda": 10.0,
                 "classifier": 10.0},
        weight_formats=resnet.WEIGHT_FORMATS, export_format="torchvision_resnet",
        original_prefix="online_network.", original_format="torchvision_resnet",
        original_head={"sfda_bottleneck": "online_network.bottleneck",
                       "sfda_bn": "online_network.bn"},
        # SFDAResNetBase registers its layers twice: as attributes and in `feature_layers`.
        original_aliases={f"online_network.feature_layers.{i}.": f"online_network.{name}."
                          for i, name in {"0": "conv1", "1": "bn1", "4": "layer1",
                                          "5": "layer2", "6": "layer3", "7": "layer4"}.items()}),
}


def get(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"config.model.backbone={name!r}: unknown backbone (registered: "
                     f"{sorted(BACKBONES)})")
  return BACKBONES[name]


def size_of(model_config) -> str:
  """The named size a `config.model` asks for (None = the backbone's default)."""
  size = model_config.size
  return get(model_config.backbone).default_size if size is None else size


def lr_mult(model_config, optim_config) -> dict[str, float]:
  """Per-group multipliers: the config's where given, else the backbone's own."""
  entry = get(model_config.backbone)
  given = dict(optim_config.lr_mult)
  unknown = sorted(set(given) - set(GROUPS))
  if unknown:
    raise ValueError(f"config.optim.lr_mult has unknown parameter group(s) {unknown}; the "
                     f"groups are {list(GROUPS)}")
  return {g: float(entry.lr_mult[g] if given.get(g) is None else given[g]) for g in GROUPS}


def arch_of(model_config) -> dict[str, Any]:
  """The architecture fields a checkpoint records and must match (size resolved)."""
  entry = get(model_config.backbone)
  out = {k: model_config.get(k) for k in entry.arch_keys}
  out["size"] = size_of(model_config)
  return out
