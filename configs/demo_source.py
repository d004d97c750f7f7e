"""Demo source stage on the built-in synthetic FER data (generated under data/ if absent).

`configs/source.py:runlocal` grown to a demo: a tiny ViT (patch 8) at 32 px that trains from
scratch in a minute or two on a laptop CPU. Source domain: colour studio portraits; target
domain: faded, noisy, blurred, off-centre faces on cluttered backgrounds.
"""
from configs import source
from eercl_jax import config_defaults
from eercl_jax.data.datasets import synthetic


def demo_sizes(c):
  """What both demo stages change in the dry run (`runlocal`): the full synthetic set (150
  training, 40 test and 60 target images per class), a wider head, 64 images per step."""
  c.data.synthetic.update(synthetic.DEFAULTS, image_size=32)
  c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 128, 128, 64
  c.model.dropout = 0.1
  c.batch_size, c.bn_group_size, c.eval_batch_size = 64, 32, 128
  return c


def get_config(arg=None):
  """`configs/demo_source.py:runlocal`: the demo shrunk to the dry run's sizes (the tests' runs)."""
  a = config_defaults.parse_arg(arg, runlocal=False)
  c = demo_sizes(source.get_config("source=synth_studio,target=synth_wild,runlocal"))
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
  return config_defaults.runlocal(c) if a.runlocal else c
