"""RAF-DB -> SFEW 2.0 adaptation with the EERCL recipe of `config_defaults.adapt_config`
(docs/method.md + the ViT-B optimiser). Name the source run with --config.source_checkpoint."""
from eercl_jax import config_defaults


def get_config():
  c = config_defaults.adapt_config(target="sfew", source="raf")
  # bfloat16 compute with float32 parameters, optimiser state, BN statistics, banks and
  # losses: GPU tensor cores run bfloat16 ~15x faster than float32 and the two agree
  # within the tolerances of docs/toolchain.md#mixed-precision (on a CPU: float32).
  c.model.dtype = "bfloat16"
  return c
