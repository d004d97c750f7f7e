"""RAF-DB -> jaffe adaptation, ViT-B/16: `configs/adapt.py:target=jaffe` (its docstring has the recipe).
Name the source run with --config.source_checkpoint."""
from configs import adapt


def get_config():
  return adapt.get_config("target=jaffe")
