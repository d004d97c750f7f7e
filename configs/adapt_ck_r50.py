"""RAF-DB -> CK+ adaptation with ResNet-50: the original FER configuration exactly (algorithm.md 2).

EERCL's `class_relation_fer_AaD_rc.py` on `resnet_50_sfda_simplified_fer_target_model.py`:
SGD (Nesterov, momentum 0.9, coupled wd 1e-3), constant lr 1e-4 with multipliers backbone 1 /
bottleneck+BN 10 / classifier 10 (frozen); 2 GPUs x 32 images per view (BN groups of 32, AaD
scaled by 1/W with W=2), EMA teacher 0.99, AaD k=4, bank refresh + clustering every 50 steps,
class-relation contrast (threshold 0.95, temperature 0.07, cluster labels), relation-weighted
InfoNCE (weight 1, temperature 0.07, negative banks of 512); 15000 steps, evaluated every 300,
seed 2023.

Source model: a run of configs/source_raf_r50.py (--config.source_checkpoint=runs/<that run>), or
the original PyTorch `best_model.pth` converted with
    python -m eercl_jax.tools.import_torch best_model.pth runs/source_raf_r50_torch \
        --config=configs/source_raf_r50.py
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.adapt_config(target="ck", source="raf")
  c.source_checkpoint = "runs/source_raf_r50"
  c.model.backbone = "resnet50"
  # Every weight comes from the source checkpoint in stage 2: no ImageNet initialisation.
  c.model.init_from = ""
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-3
  c.optim.schedule = "constant"
  c.optim.lr_mult = dict(config_defaults.RESNET_LR_MULT)
  c.batch_size = 64                      # 2 GPUs x 32
  c.bn_group_size = 32
  c.virtual_devices = 2
  c.num_steps = 15000
  c.eval_every = 300
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.seed = 2023
  return c
