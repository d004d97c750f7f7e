"""Demo adaptation on the synthetic data: run after configs/demo_source.py (runs/demo_source).

`configs/adapt.py:runlocal` grown to a demo: the same method and settings as the paper configs
on the demo's tiny ViT, with a shorter schedule. `configs/demo_adapt.py:method=shot` runs a
baseline instead (source_only | adabn | tent | shot | nrc | aad), with its authors' optimiser
as configs/adapt.py gives it.
"""
from configs import adapt, demo_source
from eercl_jax import config_defaults


def get_config(arg=None):
  """`configs/demo_adapt.py:runlocal`: the demo shrunk to the dry run's sizes (the tests' runs)."""
  a = config_defaults.parse_arg(arg, method="eercl", runlocal=False)
  c = demo_source.demo_sizes(adapt.get_config(
      f"target=synth_wild,source=synth_studio,method={a.method},runlocal"))
  c.source_checkpoint = "runs/demo_source"
  if a.method == "eercl":
    c.optim.lr = 0.002
    c.optim.lr_mult.backbone = 1.0        # trained from scratch: no 0.1x for the backbone
  else:
    c.bn_group_size = c.batch_size        # a baseline's BN: the whole batch (adapt.baseline)
  c.num_steps = 300
  c.log_every = 50
  c.eval_every = 100
  c.checkpoint_every = 100
  c.adapt.refresh_every = 50
  c.adapt.refresh_batch_size = 128
  return config_defaults.runlocal(c) if a.runlocal else c
