"""RAF-DB -> CK+ adaptation: EERCL with the FER settings of algorithm.md 2.2 and the ViT-B recipe.

64 images per step (BN groups of 32, three views each), EMA teacher 0.99, frozen classifier,
AaD k=4 (scaled 1/W, W=2), bank refresh + clustering every 50 steps, class-relation contrast
against cluster labels with confidence threshold 0.95 and temperature 0.07, relation-weighted
InfoNCE (weight 1, temperature 0.07) against negative banks of 512; SGD lr 4e-4 constant,
wd 5e-4; 15000 steps, evaluated every 300. Set the source run with
--config.source_checkpoint=runs/<source run>.
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.adapt_config(target="ck", source="raf")
  c.source_checkpoint = "runs/source_raf"
  return c
