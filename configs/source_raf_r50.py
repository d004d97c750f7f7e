"""RAF-DB source stage, ResNet-50 (the original FER configuration):
`configs/source.py:source=raf,backbone=resnet` (its docstring has the recipe and the weight file
it expects)."""
from configs import source


def get_config():
  return source.get_config("source=raf,backbone=resnet")
