"""RAF-DB -> JAFFE adaptation with the EERCL recipe of `config_defaults.adapt_config`
(docs/method.md + the ViT-B optimiser). Name the source run with --config.source_checkpoint."""
from eercl_jax import config_defaults


def get_config():
  return config_defaults.adapt_config(target="jaffe", source="raf")
