"""RAF-DB source stage with ResNet-50: the original FER configuration (docs/method.md).

What differs from the ViT-B recipe of `config_defaults.source_config`: torchvision ResNet-50
(ImageNet-1k V1 weights) with the plain head (its learning-rate multipliers come from the
backbone registry: backbone 1x, bottleneck + BN 10x, classifier 10x), lr 1e-3, coupled weight
decay 0.01, InvLR gamma 0.005, 20000 steps of 128 images on one GPU (so BN statistics over all
128), CK+ as the monitored target.

ImageNet weights: download torchvision's file yourself (no network access is assumed at run time)
    mkdir -p weights && wget -P weights https://download.pytorch.org/models/resnet50-0676ba61.pth
or point --config.model.init_from at another copy (a .pth/.safetensors/.npz with torchvision names).
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.source_config(source="raf", target="ck")   # the original's target_domain
  c.model.backbone = "resnet"
  c.model.init_from = "weights/resnet50-0676ba61.pth"   # torchvision IMAGENET1K_V1 (see above)
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.gamma = 0.005
  c.batch_size = 128                     # 1 GPU x 128
  c.bn_group_size = 128                  # one BN group: the original's single GPU
  c.num_steps = 20000
  # bfloat16 compute with float32 parameters, optimiser state, BN statistics, banks and
  # losses: GPU tensor cores run bfloat16 ~15x faster than float32 and the two agree
  # within the tolerances of docs/toolchain.md#mixed-precision (on a CPU: float32).
  c.model.dtype = "bfloat16"
  return c
