"""RAF-DB -> CK+ adaptation with ResNet-50: the original FER configuration (docs/method.md).

What differs from the ViT-B recipe of `config_defaults.adapt_config`: the ResNet backbone (its
learning-rate multipliers come from the backbone registry: backbone 1x, bottleneck + BN 10x,
classifier 10x, frozen), constant lr 1e-4 and coupled weight decay 1e-3. The method settings
(2 GPUs x 32 images per view, EMA 0.99, AaD k=4, refresh every 50 steps, thresholds,
temperatures, negative banks of 512, 15000 steps, seed 2023) are the defaults.

Source model: a run of configs/source_raf_r50.py (--config.source_checkpoint=runs/<that run>), or
the original PyTorch `best_model.pth` converted with
    python -m eercl_jax.tools.import_torch best_model.pth runs/source_raf_r50_torch \
        --config=configs/source_raf_r50.py
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.adapt_config(target="ck", source="raf")
  c.source_checkpoint = "runs/source_raf_r50"
  c.model.backbone = "resnet"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-3
  # bfloat16 compute with float32 parameters, optimiser state, BN statistics, banks and
  # losses: GPU tensor cores run bfloat16 ~15x faster than float32 and the two agree
  # within the tolerances of docs/toolchain.md#mixed-precision (on a CPU: float32).
  c.model.dtype = "bfloat16"
  return c
