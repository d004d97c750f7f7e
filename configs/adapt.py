"""The adaptation stage as one family of configs (big_vision's `get_config(arg)`):

    --config=configs/adapt.py:target=expw                       RAF-DB -> ExpW, ViT-B/16
    --config=configs/adapt.py:target=ck,backbone=resnet         RAF-DB -> CK+, ResNet-50
    --config=configs/adapt.py:target=ck,backbone=resnet,runlocal

Arguments: target (expw | ck | jaffe | sfew | fer2013, or any domain with lists), source (the
source domain, default raf: its test list is evaluated for forgetting), backbone (vit |
resnet), method (eercl, or a baseline: source_only | adabn | tent | shot | nrc | aad - see
below), runlocal (a CPU-sized dry run of the same config on the built-in synthetic data:
config_defaults.runlocal). Name the source run with --config.source_checkpoint (default
runs/source_<source> for the ViT, runs/source_<source>_r50 for the ResNet).

The method settings are the original's FER configuration (config_defaults.adapt_config: 64
images per step in BN groups of 32, EMA teacher 0.99, frozen classifier, AaD k=4 scaled 1/W
with W=2, bank refresh + clustering every 50 steps, class-relation contrast against cluster
labels, relation-weighted InfoNCE against negative rings of 512, 15000 steps evaluated every
300, seed 2023).
vit    the ViT-B optimiser: SGD lr 4e-4 constant, wd 5e-4, multipliers from the backbone.
resnet the original FER optimiser: SGD lr 1e-4 constant, coupled wd 1e-3, multipliers backbone
       1x, bottleneck + BN 10x, classifier 10x (frozen).

A baseline `method` gets its authors' optimiser and batch norm over the whole batch (their single
GPU); its loss settings are config.<method> (config_defaults.adapt_config), the run's length,
batch and evaluations are this family's (the same for every row of a table):
source_only, adabn  no optimiser steps (the source model; AdaBN re-estimates the BN statistics)
tent    Adam lr 1e-3, no weight decay, constant, one group (every multiplier 1x); only the
        backbone's normalisation affine trained
shot    SGD (Nesterov, momentum 0.9, coupled wd 1e-3) lr 1e-2 x (1 + 10 p)^-0.75, backbone 0.1x,
        head 1x, classifier frozen
nrc, aad  SGD (Nesterov, momentum 0.9, coupled wd 1e-3) lr 1e-3 x (1 + 10 p)^-0.75, backbone
        0.1x, head and classifier 1x (their VisDA scripts)
"""
from eercl_jax import config_defaults


def get_config(arg=None):
  a = config_defaults.parse_arg(arg, target="expw", source="raf", backbone="vit",
                                method="eercl", runlocal=False)
  if a.backbone not in ("vit", "resnet"):
    raise ValueError(f"configs/adapt.py: backbone={a.backbone!r}: expected vit or resnet")
  c = config_defaults.adapt_config(target=a.target, source=a.source)
  c.model.backbone = a.backbone
  c.model.dtype = "bfloat16"             # config_defaults._model: the paper configs' dtype
  if a.backbone == "resnet":
    c.source_checkpoint = f"runs/source_{a.source}_r50"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-3
  if a.method != "eercl":
    baseline(c, a.method)
  if a.runlocal:
    config_defaults.runlocal(c)
  return c


def baseline(c, method: str):
  """A baseline's authors' optimiser and BN groups on config `c` (see the module docstring)."""
  c.method = method
  c.bn_group_size = c.batch_size             # their single GPU: BN over the whole batch
  o = c.optim
  for group in o.lr_mult:   # their groups: the backbone at 0.1x, the rest 1x; Tent's one group
    o.lr_mult[group] = 0.1 if group == "backbone" and method != "tent" else 1.0
  if method == "tent":
    o.name, o.lr, o.weight_decay, o.schedule = "adam", 1e-3, 0.0, "constant"
  elif method in ("shot", "nrc", "aad"):
    o.name, o.momentum, o.nesterov, o.weight_decay = "sgd", 0.9, True, 1e-3
    o.lr = 1e-2 if method == "shot" else 1e-3
    o.schedule, o.gamma, o.power = "shot", 10.0, 0.75
  return c
