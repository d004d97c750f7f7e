"""RAF-DB -> (ExpW) source stage: ViT-B/16 at 224 with the original's ViT-B recipe.

SGD (Nesterov, momentum 0.9, coupled wd 5e-4), InvLR(gamma 1e-3, power 0.75) from lr 0.004,
per-group multipliers ViT 0.1 / head 1 / sfda bottleneck+BN 10 / classifier 10, 2000 steps of
64 images (BN groups of 32 = the original's 2 GPUs x 32), label smoothing 0.1. Evaluated on the
target and source test lists; the best checkpoint is chosen by source test accuracy.
"""
from eercl_jax import config_defaults


AUGREG_B16 = ("weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
              "steps_20k-lr_0.01-res_224.npz")


def get_config():
  c = config_defaults.source_config(source="raf", target="expw")
  # The original's ImageNet-21k AugReg ViT-B/16 (public .npz, fetched by the user beforehand).
  c.model.init_from = AUGREG_B16
  # bfloat16 compute with float32 parameters, optimiser state, BN statistics, banks and
  # losses: GPU tensor cores run bfloat16 ~15x faster than float32 and the two agree
  # within the tolerances of docs/toolchain.md#mixed-precision (on a CPU: float32).
  c.model.dtype = "bfloat16"
  return c
