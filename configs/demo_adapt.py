"""Demo adaptation on the synthetic data: run after configs/demo_source.py (runs/demo_source).

Same method and settings as configs/adapt_*.py on a tiny ViT, with a shorter schedule.
"""
from eercl_jax import config_defaults
from configs import demo_source


def get_config():
  src = demo_source.get_config()
  c = config_defaults.adapt_config(target="synth_wild", source="synth_studio")
  c.source_checkpoint = "runs/demo_source"
  c.data = src.data
  c.data.train_list = c.data.eval_lists.target
  c.data.select_by = "target"
  c.model = src.model
  c.optim.lr = 0.002
  c.optim.lr_mult.backbone = 1.0          # trained from scratch: no 0.1x for the backbone
  c.num_steps = 300
  c.log_every = 50
  c.eval_every = 100
  c.checkpoint_every = 100
  c.adapt.refresh_batch_size = 128
  return c
