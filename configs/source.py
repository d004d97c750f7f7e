"""The source stage as one family of configs (big_vision's `get_config(arg)`):

    --config=configs/source.py                                  RAF-DB, ViT-B/16 (the default)
    --config=configs/source.py:backbone=resnet                  RAF-DB, ResNet-50
    --config=configs/source.py:source=raf,target=ck,backbone=resnet,runlocal

Arguments: source (the labelled list's domain, default raf), target (the target list evaluated
alongside, for monitoring; default expw for the ViT, ck for the ResNet as the original),
backbone (vit | resnet), runlocal (a CPU-sized dry run of the same config on the built-in
synthetic data: config_defaults.runlocal).

vit    the original's ViT-B recipe: ViT-B/16 at 224 from the ImageNet-21k AugReg .npz, SGD
       (Nesterov, momentum 0.9, coupled wd 5e-4), InvLR(gamma 1e-3, power 0.75) from lr 0.004,
       per-group multipliers ViT 0.1 / head 1 / sfda bottleneck+BN 10 / classifier 10, 2000
       steps of 64 images (BN groups of 32 = the original's 2 GPUs x 32), label smoothing 0.1.
resnet the original FER configuration: torchvision ResNet-50 (ImageNet-1k V1 weights) with the
       plain head (multipliers backbone 1, bottleneck + BN 10, classifier 10), lr 1e-3, coupled
       wd 0.01, InvLR gamma 0.005, 20000 steps of 128 images on one GPU (one BN group of 128).

Both evaluate on the target and source test lists; the best checkpoint is chosen by source test
accuracy (the original's rule). The weight files are local (README: Pretrained weights):
    weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz
    weights/resnet50-0676ba61.pth    (torchvision's IMAGENET1K_V1 file)
"""
from eercl_jax import config_defaults

AUGREG_B16 = ("weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
              "steps_20k-lr_0.01-res_224.npz")
RESNET50 = "weights/resnet50-0676ba61.pth"


def get_config(arg=None):
  a = config_defaults.parse_arg(arg, source="raf", target=None, backbone="vit", runlocal=False)
  if a.backbone not in ("vit", "resnet"):
    raise ValueError(f"configs/source.py: backbone={a.backbone!r}: expected vit or resnet")
  target = a.target or ("expw" if a.backbone == "vit" else "ck")
  c = config_defaults.source_config(source=a.source, target=target)
  c.model.backbone = a.backbone
  c.model.dtype = "bfloat16"             # config_defaults._model: the paper configs' dtype
  if a.backbone == "vit":
    c.model.init_from = AUGREG_B16
  else:
    c.model.init_from = RESNET50
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.01
    c.optim.gamma = 0.005
    c.batch_size = 128                   # 1 GPU x 128
    c.bn_group_size = 128                # one BN group: the original's single GPU
    c.num_steps = 20000
  if a.runlocal:
    config_defaults.runlocal(c)
  return c
