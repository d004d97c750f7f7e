"""Demo source stage on the built-in synthetic FER data (generated under data/ if absent).

A tiny ViT at 64 px that trains from scratch in a few minutes on a laptop CPU. Source domain:
colour studio portraits; target domain: grey, noisy, blurred, off-centre faces.
"""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.source_config(source="synth_studio", target="synth_wild")
  c.data.synthetic.enabled = True
  c.data.resize, c.data.crop = 72, 64
  c.data.num_workers = 0
  c.data.check_images = "exists"
  c.model.vit_size = "mu/8"
  c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 128, 128, 64
  c.model.dropout = 0.1
  # Trained from scratch, so the backbone is not slowed down as for ImageNet weights.
  c.optim.lr = 0.01
  c.optim.gamma = 0.005
  c.optim.lr_mult.backbone = 1.0
  c.num_steps = 600
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 200
  c.eval_batch_size = 128
  return c
