"""RAF-DB source stage, ViT-B/16 (the original's ViT-B recipe): `configs/source.py:source=raf`
(its docstring has the recipe and the weight file it expects)."""
from configs import source


def get_config():
  return source.get_config("source=raf")
