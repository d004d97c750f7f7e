"""Settings of `python -m eercl_jax.bench` (the model, sizes and batches it measures).

  --config=configs/bench.py             'cpu': tiny ViT at 32 px, float32; about a minute on a CPU
  --config=configs/bench.py:vit_b16_224 the real job: ViT-B/16 at 224, bfloat16
  --config=configs/bench.py:gpu_check   vit_b16_224 plus a short source + adaptation smoke run
  (`--preset=NAME` is short for `--config=configs/bench.py:NAME`)

Any training config works as well (`--config=configs/adapt_expw.py`): the bench takes its
model, data sizes, batch sizes and adaptation settings. Random weights; the synthetic images the
bench writes stand in for the data (a step's cost does not depend on them).
"""
from eercl_jax import config_defaults

PRESETS = ("cpu", "vit_b16_224", "gpu_check")


def get_config(preset: str = "cpu"):
  if preset not in PRESETS:
    raise ValueError(f"configs/bench.py: unknown preset {preset!r}; expected one of {PRESETS}")
  c = config_defaults.adapt_config(target="bench", source="bench")
  c.model.init_from = ""
  if preset == "cpu":
    c.model.size = "mu/8"
    c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 128, 128, 64
    c.data.resize, c.data.crop = 36, 32
    c.model.dtype = "float32"          # CPUs have no fast bfloat16 matmuls
  else:
    c.model.size = "B/16"
    # bfloat16 compute, float32 parameters, optimiser state, BN statistics, banks and losses:
    # the GPUs' tensor cores run bfloat16 at ~16x their float32 rate
    # (docs/toolchain.md#mixed-precision gives the measured agreement with float32).
    c.model.dtype = "bfloat16"
    # A throughput batch for one GPU (the method's global batch is 64: --config.batch_size=64).
    c.batch_size = 256
    c.adapt.refresh_batch_size = 512
  return c
