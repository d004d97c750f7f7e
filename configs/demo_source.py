"""Demo source stage on the built-in synthetic FER data (generated under data/ if absent).

A tiny ViT (patch 8) at 32 px that trains from scratch in a minute or two on a laptop CPU.
Source domain: colour studio portraits; target domain: faded, noisy, blurred, off-centre faces on
cluttered backgrounds.
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.source_config(source="synth_studio", target="synth_wild")
  c.data.synthetic.enabled = True
  c.data.synthetic.image_size = 32
  c.data.resize, c.data.crop = 36, 32
  c.data.num_workers = 0
  c.model.size = "mu/8"
  c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 128, 128, 64
  c.model.dropout = 0.1
  # Trained from scratch: one learning rate for every group (the ViT-B recipe's 0.1x backbone and
  # 10x head multipliers are for ImageNet weights), and a slow InvLR decay.
  c.optim.lr = 0.05
  c.optim.gamma = 0.001
  for group in c.optim.lr_mult:
    c.optim.lr_mult[group] = 1.0
  c.num_steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 128
  return c
