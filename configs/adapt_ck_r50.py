"""RAF-DB -> CK+ adaptation, ResNet-50, the original FER configuration:
`configs/adapt.py:target=ck,backbone=resnet` (its docstring has the recipe). Source model: a run
of configs/source_raf_r50.py, or the original PyTorch `best_model.pth` converted with
    python -m eercl_jax.tools.import_torch best_model.pth runs/source_raf_r50_torch \
        --config=configs/source_raf_r50.py
"""
from configs import adapt


def get_config():
  return adapt.get_config("target=ck,backbone=resnet")
