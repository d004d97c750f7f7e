"""RAF-DB source stage with ResNet-50: the original FER configuration exactly (algorithm.md 1).

EERCL's `sfda_fer_source_raf.py`: torchvision ResNet-50 (ImageNet-1k V1 weights) + Linear(2048->256)
+ BatchNorm1d(256) + weight-normalised classifier; SGD (Nesterov, momentum 0.9, coupled wd 0.01),
lr 1e-3 with per-group multipliers backbone 1 / bottleneck+BN 10 / classifier 10, InvLR(gamma 0.005,
power 0.75); 20000 steps of 128 images on one GPU (so BN statistics over all 128), label smoothing
0.1; evaluated every 500 steps on the CK+ (target) and RAF-DB (source) test lists, best checkpoint
by source test accuracy; a checkpoint every 1000 steps, 4 kept.

ImageNet weights: download torchvision's file yourself (no network access is assumed at run time)
    mkdir -p weights && wget -P weights https://download.pytorch.org/models/resnet50-0676ba61.pth
or point --config.model.init_from at another copy (a .pth/.safetensors/.npz with torchvision names).
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.source_config(source="raf", target="ck")   # the original's target_domain
  c.model.backbone = "resnet50"
  c.model.init_from = "weights/resnet50-0676ba61.pth"   # torchvision IMAGENET1K_V1 (see above)
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.schedule = "inv"
  c.optim.gamma = 0.005
  c.optim.power = 0.75
  c.optim.lr_mult = dict(config_defaults.RESNET_LR_MULT)
  c.batch_size = 128                     # 1 GPU x 128
  c.bn_group_size = 128                  # one BN group: the original's single GPU
  c.eval_batch_size = 128
  c.num_steps = 20000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.keep_checkpoints = 4
  # The original sets no seed (random each run); a fixed one keeps runs repeatable.
  c.seed = 2
  return c
